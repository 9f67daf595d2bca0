"""Multiple-choice questions answered by a causal LM (MMLU, MedMCQA, MedQA, ARC, HellaSwag rows).

Nothing is generated or parsed: the model's answer is read from its log-likelihoods, in one of two
ways (`scoring`):

  - `letter` (default; how instruction-tuned models are asked, and MMLU's original setting): the
    prompt lists the options as "A. text", one per line, and ends where the answer starts. One row
    per question; the next-token log-probabilities at the prompt's end give every letter's score at
    once. Letters past an item's own option count are never chosen (items may have 3, 4 or 5
    options in one set). Each letter must be one token, distinct from the others.
  - `option` (lm-evaluation-harness's cloze setting, e.g. HellaSwag, ARC): one row per (question,
    option), the prompt followed by the option's text; an option's score is the sum of its tokens'
    log-probabilities, divided by its length in characters (`normalize: chars`, the harness's
    `acc_norm`, which does not favour short options as the raw sum does), by its token count
    (`tokens`), or not at all (`none`, the harness's `acc`).

Training is next-token training on prompt + answer (the gold letter, or the gold option's text)
with the loss on the answer only. In letter mode the training rows score every letter too (the
position before the answer token), so validation accuracy is measured after each epoch.

Rows are left-padded (causal_classification's collator) so the answer ends every row and the model
computes vocabulary logits only for the last few positions. A prompt longer than `max_length`
loses the start of its question (an exam vignette asks its question last; never the template or
the options) and is counted (`n_truncated`).

Baselines (model-free, fitted on train): the most frequent answer position and the longest option.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from peftlab.errors import InputError
from peftlab.registry import TASKS
from peftlab.tasks.base import Prediction, TaskOptions
from peftlab.tasks.causal_classification import IGNORE, answer_logprob, answer_position
from peftlab.tasks.lm_prompt import CausalLmTask, ChatSetting, PromptFormat, check_template

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict

LETTERS = string.ascii_uppercase
LETTER_PROMPT = (
    "Answer the following multiple choice question with the letter of the correct option.\n\n"
    "{question}\n{options}\nAnswer:"
)
OPTION_PROMPT = "Question: {question}\nAnswer:"
PLACEHOLDERS = ("question", "options", "subject")


class LMMultipleChoiceOptions(TaskOptions):
    question_field: str | None = Field(None, description="the question; default: question, then context")
    start_field: str | None = Field(
        None, description="text appended to the question (HellaSwag's start of the ending); default: start if present"
    )
    choices_field: str | None = Field(None, description="a list of options; default: choices, then endings")
    label_field: str = Field("label", description="the right option: an index (0-based), or a letter A..Z")
    subject_field: str | None = Field(
        None, description="a subject per item, for per-subject accuracy; default: subject if present"
    )
    prompt: str | None = Field(
        None,
        description="the prompt: {question}, {options} (the lettered options, one per line), {subject}; "
        "default: a lettered-options instruction (scoring: letter) or 'Question: {question}\\nAnswer:' (option)",
    )
    scoring: Literal["letter", "option"] = Field(
        "letter", description="letter: the answer letter's probability; option: each option's text log-likelihood"
    )
    normalize: Literal["chars", "tokens", "none"] = Field(
        "chars", description="scoring: option: divide an option's log-likelihood by its characters, tokens, or not"
    )
    chat_template: ChatSetting = Field(
        "auto", description="wrap the prompt in the tokenizer's chat template (auto: when it has one)"
    )
    system_prompt: str | None = Field(None, description="a system message for the chat template")

    @model_validator(mode="after")
    def _check(self) -> LMMultipleChoiceOptions:
        if self.prompt is None:  # written back, so a run's saved options show the prompt it used
            self.prompt = LETTER_PROMPT if self.scoring == "letter" else OPTION_PROMPT
        required = ("question", "options") if self.scoring == "letter" else ("question",)
        check_template(self.prompt, required, PLACEHOLDERS)
        return self


@TASKS.register("lm_multiple_choice")
class LMMultipleChoice(CausalLmTask):
    """Multiple choice by a causal LM's log-likelihoods: of the answer letter, or of each option's text."""

    Options = LMMultipleChoiceOptions
    options: LMMultipleChoiceOptions
    primary_metric = "accuracy"
    higher_is_better: ClassVar[dict[str, bool]] = {"accuracy": True}
    headline_metrics = ("accuracy",)
    default_max_length = 512  # exam questions with their options; MedQA vignettes run to 300+ tokens
    bookkeeping_columns = ("truncated", "answer_tokens")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._encoded: _Encoder | None = None

    @property
    def letters(self) -> bool:
        return self.options.scoring == "letter"

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        from datasets import DatasetDict

        return DatasetDict({name: self._canonical(ds, f"{where} [{name}]") for name, ds in splits.items()})

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        return self._canonical(rows, where, labelled)

    def _fields(self, ds: Dataset, where: str, labelled: bool) -> dict[str, str | None]:
        """The source field of each canonical field (None: absent and optional)."""
        cols = ds.column_names
        opts = self.options

        def pick(given: str | None, defaults: Sequence[str], key: str, required: bool) -> str | None:
            if given is not None:
                if given not in cols:
                    raise InputError(f"{where}: no field '{given}' (task.{key}); fields: {', '.join(cols)}")
                return given
            found = next((f for f in defaults if f in cols), None)
            if found is None and required:
                raise InputError(
                    f"{where}: no {' or '.join(map(repr, defaults))} field (fields: {', '.join(cols)}); set task.{key}"
                )
            return found

        fields = {
            "question": pick(opts.question_field, ("question", "context"), "question_field", True),
            "start": pick(opts.start_field, ("start",), "start_field", False),
            "options": pick(opts.choices_field, ("choices", "endings"), "choices_field", True),
            "subject": pick(opts.subject_field, ("subject",), "subject_field", False),
            "label": opts.label_field if opts.label_field in cols else None,  # predict: rows may have none
        }
        if labelled and fields["label"] is None:
            raise InputError(
                f"{where}: no field '{opts.label_field}' (fields: {', '.join(cols)}); set task.label_field"
            )
        return fields

    def _canonical(self, ds: Dataset, where: str, labelled: bool = True) -> Dataset:
        """Rows -> {id, question, options, label (index or None), subject (or None)}; InputError naming the item."""
        from datasets import Dataset

        fields = self._fields(ds, where, labelled)
        ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        rows = [
            self._example(row, str(ids[i]), fields, f"{where}: item {ids[i]} (row {i + 1})", labelled)
            for i, row in enumerate(ds)
        ]
        return Dataset.from_list(rows)

    def _example(
        self, row: dict[str, Any], item_id: str, fields: dict[str, str | None], ref: str, labelled: bool
    ) -> dict[str, Any]:
        question_f, options_f = fields["question"], fields["options"]
        assert question_f is not None and options_f is not None
        question = row.get(question_f)
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{ref}: empty or missing question '{question_f}'")
        start = row.get(fields["start"]) if fields["start"] else None
        if isinstance(start, str) and start.strip():
            question = f"{question.rstrip()} {start.strip()}"
        options = check_options(row.get(options_f), options_f, ref)
        label_f = fields["label"]
        label = parse_label(row.get(label_f) if label_f else None, len(options), label_f or "label", ref, labelled)
        subject = row.get(fields["subject"]) if fields["subject"] else None
        return {
            "id": item_id,
            "question": question.strip(),
            "options": options,
            "label": label,
            "subject": None if subject is None or subject == "" else str(subject),
        }

    # --- features -----------------------------------------------------------------------------
    def encoder(self, tokenizer: Any) -> _Encoder:
        """The prompt for this tokenizer (the chat template renders once) and the letters' tokens."""
        if self._encoded is None or self._encoded.tokenizer is not tokenizer:
            self._encoded = _Encoder(self.options, tokenizer)
        return self._encoded

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Training rows: prompt + gold answer (letter or option text), the loss on the answer only."""
        enc = self._ready(examples, tokenizer)

        def rows(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "answer_tokens": []}
            for ex in _examples(batch):
                prompt, cut = enc.prompt_ids(ex, max_length)
                answer = [] if ex["label"] is None else enc.answer(ex, ex["label"])
                _add_row(out, prompt, answer, cut)
            return out

        return examples.map(rows, batched=True, remove_columns=examples.column_names)

    def predict_features(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Scoring rows: the prompt alone (letter), or prompt + option, one row per option (option)."""
        enc = self._ready(examples, tokenizer)

        def rows(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "answer_tokens": []}
            for ex in _examples(batch):
                prompt, cut = enc.prompt_ids(ex, max_length)
                if self.letters:
                    _add_row(out, prompt, [], cut)
                    continue
                for i in range(len(ex["options"])):
                    _add_row(out, prompt, enc.answer(ex, i), cut)
            return out

        return examples.map(rows, batched=True, remove_columns=examples.column_names)

    def _ready(self, examples: Dataset, tokenizer: Any) -> _Encoder:
        """The encoder, with a token checked for every letter these examples can be answered with."""
        enc = self.encoder(tokenizer)
        if self.letters and len(examples):
            enc.need_letters(max(len(options) for options in examples["options"]))
        return enc

    # --- outputs ------------------------------------------------------------------------------
    def reduce_outputs(self, logits: Any, labels: Any) -> torch.Tensor:  # type: ignore[override]
        """Per batch: vocabulary-sized logits -> every letter's log-probability per row (letter), or
        the answer tokens' summed log-probability per row (option)."""
        import torch

        logits = logits[0] if isinstance(logits, tuple) else logits
        if not self.letters:
            return answer_logprob(logits, labels)
        enc = self._encoded
        assert enc is not None, "featurize/predict_features run before prediction"
        rows = torch.arange(logits.shape[0], device=logits.device)
        logprobs = torch.log_softmax(logits[rows, answer_position(logits, labels)].float(), dim=-1)
        return logprobs[:, torch.tensor(enc.letter_ids, device=logprobs.device)]

    @property
    def scores_training_rows(self) -> bool:  # type: ignore[override]
        """Letter mode: a training row's answer position scores every letter, as a prompt row does."""
        return self.letters

    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        if not len(examples):
            return []
        raw = np.asarray(outputs[0] if isinstance(outputs, tuple) else outputs, dtype=np.float64)
        counts = [len(options) for options in examples["options"]]
        cut = features["truncated"]
        if self.letters:
            table = raw.reshape(len(examples), -1)
            scores = [mask_letters(row, n) for row, n in zip(table, counts, strict=True)]
            truncated = list(cut)
        else:
            flat = raw.reshape(-1)
            starts = np.cumsum([0, *counts[:-1]]).tolist()
            lengths = self._lengths(examples, features["answer_tokens"])
            scores = [flat[s : s + n] / np.asarray(lengths[s : s + n]) for s, n in zip(starts, counts, strict=True)]
            truncated = [cut[s] for s in starts]
        return [
            _record(ex, int(np.argmax(row)), [round(float(v), 5) for v in row[:n]], bool(c))
            for ex, row, n, c in zip(examples, scores, counts, truncated, strict=True)
        ]

    def _lengths(self, examples: Dataset, answer_tokens: list[int]) -> list[float]:
        """Per option row, what its log-likelihood is divided by (normalize)."""
        if self.options.normalize == "tokens":
            return [float(max(n, 1)) for n in answer_tokens]
        if self.options.normalize == "chars":  # lm-evaluation-harness: len(choice) of the choice's text
            return [float(len(option)) for options in examples["options"] for option in options]
        return [1.0] * len(answer_tokens)

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        scored = [p for p in predictions if p.get("label") is not None]
        metrics: dict[str, Any] = {"accuracy": _accuracy(scored), "n": len(scored)}
        subjects = sorted({p["subject"] for p in scored if p.get("subject") is not None})
        if subjects:
            metrics["by_subject"] = {
                s: {"accuracy": _accuracy(group), "n": len(group)}
                for s in subjects
                for group in [[p for p in scored if p.get("subject") == s]]
            }
        metrics.update(letter_shares(scored))
        metrics["n_truncated"] = sum(1 for p in predictions if p.get("truncated"))
        return metrics

    def baselines(self, train: Dataset) -> dict[str, Callable[[Dataset], list[Prediction]]]:
        labels = [label for label in train["label"] if label is not None]
        if not labels:
            return {}
        counts = Counter(labels)
        order = sorted(range(len(LETTERS)), key=lambda i: (-counts[i], i))  # most frequent first, then A..Z

        def position(examples: Dataset) -> list[Prediction]:
            return [_record(ex, next(i for i in order if i < len(ex["options"]))) for ex in examples]

        def longest(examples: Dataset) -> list[Prediction]:
            rng = np.random.default_rng(0)  # ties at random: a set with no length cue scores chance
            return [_record(ex, _argmax_random([len(o) for o in ex["options"]], rng)) for ex in examples]

        return {"most frequent position": position, "cue: longest option": longest}

    # --- probes -------------------------------------------------------------------------------
    def probe_input(self, example: dict[str, Any]) -> str:
        return str(example.get("question", example.get("id", "")))

    def probe_match(self, prediction: Prediction, expected: Any) -> bool:
        """An expected answer given as a letter or as an index."""
        given = str(expected).strip().upper()
        return given in (str(prediction.get("prediction")), str(prediction.get("prediction_index")))


# --- input checks -----------------------------------------------------------------------------


def check_options(value: Any, field: str, ref: str) -> list[str]:
    """An item's options: a list of 2..26 non-empty texts (each answerable by a letter)."""
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise InputError(f"{ref}: '{field}' must be a list of option texts, got {type(value).__name__}")
    if len(value) < 2:
        raise InputError(f"{ref}: '{field}' has {len(value)} option; multiple choice needs at least 2")
    if len(value) > len(LETTERS):
        raise InputError(f"{ref}: '{field}' has {len(value)} options, more than the {len(LETTERS)} letters A..Z")
    for i, option in enumerate(value):
        if not option.strip():
            raise InputError(f"{ref}: option {LETTERS[i]} (index {i}) of '{field}' is empty")
    return [option.strip() for option in value]


def parse_label(value: Any, n: int, field: str, ref: str, labelled: bool) -> int | None:
    """The right option's index from an index (int or digit string, 0-based) or a letter."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if labelled:
            raise InputError(f"{ref}: missing label '{field}'")
        return None
    letter = value.strip().upper() if isinstance(value, str) else ""
    if len(letter) == 1 and letter in LETTERS:
        index = LETTERS.index(letter)
        if index >= n:
            raise InputError(
                f"{ref}: label '{field}' {value!r} names no option: the item has {n} (A..{LETTERS[n - 1]})"
            )
        return index
    index = _index(value)
    if index is None:
        raise InputError(f"{ref}: label '{field}' {value!r} is not an option index (0..{n - 1}) or letter")
    if not 0 <= index < n:
        raise InputError(f"{ref}: label '{field}' {index} is out of range: the item has {n} options (0..{n - 1})")
    return index


def _index(value: Any) -> int | None:
    """An int, a whole float (a CSV column with gaps) or a digit string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


# --- scoring ----------------------------------------------------------------------------------


def mask_letters(row: np.ndarray, n: int) -> np.ndarray:
    """An item's letter scores with the letters past its n options at -inf: never chosen (a set may
    mix 3-, 4- and 5-option items; every row scores as many letters as the largest item has)."""
    masked = row.copy()
    masked[n:] = -np.inf
    return masked


def letter_shares(predictions: list[Prediction]) -> dict[str, Any]:
    """Predicted and true share of each answer letter (the report's position-bias line)."""
    if not predictions:
        return {}
    width = max(max(p.get("n_options", 0), p["prediction_index"] + 1, p["label"] + 1) for p in predictions)
    predicted = Counter(p["prediction_index"] for p in predictions)
    true = Counter(p["label"] for p in predictions)
    total = len(predictions)
    return {
        "predicted_share": {LETTERS[i]: predicted[i] / total for i in range(width)},
        "true_share": {LETTERS[i]: true[i] / total for i in range(width)},
    }


def _accuracy(predictions: list[Prediction]) -> float:
    return sum(p["prediction_index"] == p["label"] for p in predictions) / max(len(predictions), 1)


def _argmax_random(values: list[int], rng: np.random.Generator) -> int:
    top = max(values)
    tied = [i for i, v in enumerate(values) if v == top]
    return tied[0] if len(tied) == 1 else int(tied[rng.integers(len(tied))])


def _record(ex: dict[str, Any], index: int, scores: list[float] | None = None, truncated: bool = False) -> Prediction:
    label = ex["label"]
    record: Prediction = {
        "id": ex["id"],
        "prediction": LETTERS[index],
        "reference": None if label is None else LETTERS[label],
        "prediction_index": index,
        "label": label,
        "n_options": len(ex["options"]),
    }
    if scores is not None:
        record["scores"] = scores
        record["truncated"] = truncated
    if ex.get("subject") is not None:
        record["subject"] = ex["subject"]
    return record


# --- encoding ---------------------------------------------------------------------------------


def _examples(batch: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _add_row(out: dict[str, list], prompt: list[int], answer: list[int], truncated: bool) -> None:
    out["input_ids"].append(prompt + answer)
    out["labels"].append([IGNORE] * len(prompt) + answer)
    out["truncated"].append(truncated)
    out["answer_tokens"].append(len(answer))


class _Encoder:
    """One tokenizer's view of the task: the prompt, the options' and letters' answer tokens."""

    def __init__(self, options: LMMultipleChoiceOptions, tokenizer: Any) -> None:
        assert options.prompt is not None
        self.tokenizer = tokenizer
        self.letters = options.scoring == "letter"
        self.format = PromptFormat(
            options.prompt, tokenizer, chat=options.chat_template, system_prompt=options.system_prompt
        )
        self.letter_ids: list[int] = []

    def need_letters(self, n: int) -> None:
        """Letters A.. up to the n-th, each one token that no other letter shares (else InputError)."""
        while len(self.letter_ids) < n:
            letter = LETTERS[len(self.letter_ids)]
            ids = self.format.answer_ids(letter)
            if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
                raise InputError(
                    f"task.scoring: letter: the answer letter {letter!r} is not one known token with this tokenizer "
                    f"({ids}); use scoring: option"
                )
            if ids[0] in self.letter_ids:
                other = LETTERS[self.letter_ids.index(ids[0])]
                raise InputError(
                    f"task.scoring: letter: the letters {other!r} and {letter!r} are the same token {ids[0]} with "
                    "this tokenizer; use scoring: option"
                )
            self.letter_ids.append(ids[0])

    def values(self, ex: dict[str, Any]) -> dict[str, str]:
        options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(ex["options"]))
        subject = (ex.get("subject") or "").replace("_", " ")  # MMLU's "abstract_algebra"
        return {"question": ex["question"], "options": options, "subject": subject}

    def answer(self, ex: dict[str, Any], index: int) -> list[int]:
        """The tokens scored for option `index`: its letter, or its text."""
        if self.letters:
            return [self.letter_ids[index]]
        return self.format.answer_ids(ex["options"][index])

    def prompt_ids(self, ex: dict[str, Any], max_length: int) -> tuple[list[int], bool]:
        """The prompt's tokens, and whether its question was cut to leave room for the longest answer."""
        room = 1 if self.letters else max(len(self.answer(ex, i)) for i in range(len(ex["options"])))
        budget = max_length - room
        if budget < 1:
            raise InputError(
                f"data.max_length: item {ex['id']}: an option takes {room} tokens, leaving no room for the prompt"
            )
        values = self.values(ex)
        ids = self.format.encode(values)
        if len(ids) <= budget:
            return ids, False
        try:
            return self.format.fit(values, "question", budget, keep="end"), True  # exams ask at the end
        except InputError as exc:
            raise InputError(f"item {ex['id']}: {exc}") from None
