"""Short-answer questions answered by a causal LM generating text (TriviaQA, NQ-open, SQuAD, GSM8K).

Each example is a prompt (the question, and a context passage when `context_field` is set; the
tokenizer's chat template wraps it when it has one, see lm_prompt.py) and one or more gold answers
(aliases). Training is next-token training on prompt + target + end token, with the loss on the
target and the end token only: the target is the first gold answer, or (`target: rationale`) the
worked steps followed by a line "The answer is X." Prediction generates greedily (engine.generate:
batched, KV cache), stops at the end token and, for short answers, at the first line break, and
scores the answer against every alias:
  - exact_match and f1: the official SQuAD normalisation and the best alias (qa_metrics.py), as fractions;
  - contains: a normalised alias occurs, as whole words, in the normalised answer;
  - numeric_match: the last number in the answer equals the gold number (commas removed), reported
    only when every gold answer is a number (GSM8K-style data).
With a rationale, the answer is what follows the last "The answer is" (else the last line).
`metric` says which of these is the primary one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from peftlab.errors import InputError
from peftlab.registry import TASKS
from peftlab.tasks.base import Prediction, TaskOptions
from peftlab.tasks.causal_classification import IGNORE
from peftlab.tasks.lm_prompt import CausalLmTask, ChatSetting, PromptFormat, check_template, placeholders
from peftlab.tasks.qa_metrics import best_over_truths, exact_match_score, f1_score, normalize_answer, squad_scores

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from torch import nn

PRIMARY = {"squad": "exact_match", "numeric": "numeric_match", "contains": "contains"}
MAX_NEW_TOKENS = {"answer": 32, "rationale": 256}  # a worked solution needs room; a short answer does not
FINAL_ANSWER = "The answer is {answer}."
# the last "answer is X" of a worked solution (X up to the end of its line)
_FINAL = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?answer\s*:\s*", re.IGNORECASE)
# a number: with thousands separators (1,234.5) or without (1234, -3.5); a minus sign only where it
# starts a word ("3-4" ends with the number 4, not -4)
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def default_prompt(target: str, with_context: bool) -> str:
    """An instruction an instruction-tuned model follows without training: what to answer and how briefly."""
    if target == "rationale":
        head = f'Solve the problem step by step. End with a last line "{FINAL_ANSWER.format(answer="X")}"'
    elif with_context:
        head = "Answer the question about the passage with a short answer only, no explanation."
    else:
        head = "Answer the question with a short answer only, no explanation."
    passage = "\nPassage: {context}" if with_context else ""
    return f"{head}{passage}\nQuestion: {{question}}\nAnswer:"


class LMGenerationOptions(TaskOptions):
    question_field: str = Field("question", description="the field holding the question")
    answers_field: str = Field(
        "answers", description="the gold answers: a list of aliases, one string, or SQuAD's {text: [...]}"
    )
    context_field: str | None = Field(None, description="a passage shown with the question (the prompt's {context})")
    rationale_field: str = Field("rationale", description="the worked steps (target: rationale)")
    target: Literal["answer", "rationale"] = Field(
        "answer", description="train on the first answer, or on the rationale + 'The answer is X.'"
    )
    prompt: str | None = Field(
        None, description="the prompt: {question} (and {context}) are replaced; default: a short-answer instruction"
    )
    metric: Literal["squad", "numeric", "contains"] = Field(
        "squad", description="the primary metric: exact_match (squad), numeric_match or contains"
    )
    max_new_tokens: PositiveInt | None = Field(
        None, description="tokens generated at most; default 32 (target answer) or 256 (rationale)"
    )
    stop_at_newline: bool | None = Field(
        None, description="stop generating at the first line break; default: true for answers, false for rationales"
    )
    chat_template: ChatSetting = Field(
        "auto", description="wrap the prompt in the tokenizer's chat template (auto: when it has one)"
    )
    system_prompt: str | None = Field(None, description="a system message for the chat template")

    @model_validator(mode="after")
    def _check(self) -> LMGenerationOptions:
        if self.prompt is None:
            self.prompt = default_prompt(self.target, self.context_field is not None)
        if self.context_field is None and "context" in placeholders(self.prompt):
            raise ValueError("the prompt uses {context} but task.context_field is not set: set it to the passage field")
        known = ("question", "context") if self.context_field else ("question",)
        check_template(self.prompt, required=known, known=known)
        if self.max_new_tokens is None:
            self.max_new_tokens = MAX_NEW_TOKENS[self.target]
        if self.stop_at_newline is None:
            self.stop_at_newline = self.target == "answer"
        return self


@TASKS.register("lm_generation")
class LMGeneration(CausalLmTask):
    """Short answers generated by a causal LM, scored against every gold alias."""

    Options = LMGenerationOptions
    options: LMGenerationOptions
    primary_metric = "exact_match"  # the class default (metric: squad); each instance follows its options
    higher_is_better: ClassVar[dict[str, bool]] = {
        "exact_match": True,
        "f1": True,
        "numeric_match": True,
        "contains": True,
        "loss": False,
    }
    default_max_length = 256  # prompt + generated tokens: room for a SQuAD passage or a worked solution
    score_scale = 1.0  # every metric a fraction (the SQuAD figures divided by 100)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.primary_metric = PRIMARY[self.options.metric]  # type: ignore[misc]
        self._format: PromptFormat | None = None

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        """Canonical examples; training and validation rows need the rationale when it is the target."""
        from datasets import DatasetDict

        rationale = self.options.target == "rationale"
        return DatasetDict(
            {
                name: self._canonical(ds, f"{where} [{name}]", True, rationale and name in ("train", "validation"))
                for name, ds in splits.items()
            }
        )

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        return self._canonical(rows, where, labelled, needs_rationale=False)

    def _canonical(self, ds: Dataset, where: str, labelled: bool, needs_rationale: bool) -> Dataset:
        """Rows -> {id, question, answers[, context][, rationale]}; bad rows are errors naming the example."""
        o = self.options
        needed = [o.question_field, *([o.answers_field] if labelled else [])]
        needed += [o.context_field] if o.context_field else []
        needed += [o.rationale_field] if needs_rationale else []
        missing = [f for f in needed if f not in ds.column_names]
        if missing:
            raise InputError(
                f"{where}: no field {', '.join(map(repr, missing))} (fields: {', '.join(ds.column_names)}); "
                "set task.question_field / answers_field / context_field / rationale_field"
            )
        ids = [str(i) for i in ds["id"]] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        duplicates = [i for i, n in Counter(ids).items() if n > 1]
        if duplicates:
            raise InputError(f"{where}: duplicate example ids {', '.join(duplicates[:5])}; ids must be unique")
        rows = [
            self._row(row, ex_id, f"{where}: example {ex_id}", labelled, needs_rationale)
            for ex_id, row in zip(ids, ds, strict=True)
        ]
        from datasets import Dataset

        return Dataset.from_list(rows)

    def _row(self, row: dict[str, Any], ex_id: str, at: str, labelled: bool, needs_rationale: bool) -> dict[str, Any]:
        o = self.options
        out: dict[str, Any] = {"id": ex_id, "question": _text(row.get(o.question_field), at, o.question_field)}
        if o.context_field:
            out["context"] = _text(row.get(o.context_field), at, o.context_field)
        answers = parse_answers(row.get(o.answers_field), at, o.answers_field)
        if labelled and not answers:
            raise InputError(f"{at}: no answer in '{o.answers_field}'; every question needs at least one")
        if labelled and o.metric == "numeric":
            bad = [a for a in answers if parse_number(a) is None]
            if bad:
                raise InputError(
                    f"{at}: '{o.answers_field}': {bad[0]!r} is not a number, which task.metric: numeric needs"
                )
        out["answers"] = answers
        if o.target == "rationale":
            given = row.get(o.rationale_field)
            if needs_rationale:
                given = _text(given, at, o.rationale_field)
            out["rationale"] = given if isinstance(given, str) else None
        return out

    # --- features -----------------------------------------------------------------------------
    def prompt_format(self, tokenizer: Any) -> PromptFormat:
        """The prompt for this tokenizer (the chat template is rendered once)."""
        if self._format is None or self._format.tokenizer is not tokenizer:
            o = self.options
            assert o.prompt is not None, "the options validator sets the default prompt"
            self._format = PromptFormat(o.prompt, tokenizer, chat=o.chat_template, system_prompt=o.system_prompt)
        return self._format

    def target_text(self, example: dict[str, Any]) -> str:
        """What the model learns to write: the first gold answer, or the worked steps and that answer."""
        answer = example["answers"][0] if example["answers"] else ""
        if self.options.target == "answer" or not answer:
            return answer
        return f"{str(example.get('rationale') or '').strip()}\n{FINAL_ANSWER.format(answer=answer)}".strip()

    def _prompt_ids(self, fmt: PromptFormat, example: dict[str, Any], budget: int) -> list[int]:
        values = {"question": example["question"], "context": example.get("context") or ""}
        shorten = "context" if self.options.context_field else "question"
        try:
            return fmt.fit(values, shorten, budget)
        except InputError as exc:
            raise InputError(f"example {example['id']}: {exc}") from None

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Training rows: prompt + target + end token; the loss on the target and the end token only.

        A long target does not push the prompt below half of max_length; a target longer than the
        room left is cut (and then has no end token).
        """
        fmt = self.prompt_format(tokenizer)
        end = end_token(tokenizer)

        def rows(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": []}
            for example in _examples(batch):
                text = self.target_text(example)
                target = [*fmt.answer_ids(text), end] if text else []
                prompt = self._prompt_ids(fmt, example, max(max_length - len(target), max_length // 2))
                target = target[: max_length - len(prompt)]
                out["input_ids"].append(prompt + target)
                out["labels"].append([IGNORE] * len(prompt) + target)
            return out

        return examples.map(rows, batched=True, remove_columns=examples.column_names)

    def predict_features(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Prompt-only rows, one per example, leaving max_new_tokens of data.max_length for the answer
        (a long context is cut; the prompt keeps at least half of max_length)."""
        fmt = self.prompt_format(tokenizer)
        assert self.options.max_new_tokens is not None
        budget = max(max_length - self.options.max_new_tokens, max_length // 2)

        def rows(batch: dict[str, list]) -> dict[str, list]:
            return {"input_ids": [self._prompt_ids(fmt, example, budget) for example in _examples(batch)]}

        return examples.map(rows, batched=True, remove_columns=examples.column_names)

    @property
    def scores_training_rows(self) -> bool:  # type: ignore[override]
        """Scoring needs generated text, not the training rows' logits: no per-epoch metrics (loss only)."""
        return False

    def model_outputs(
        self, model: nn.Module, features: Dataset, tokenizer: Any, spec: Any, precision: str
    ) -> tuple[list[str], float]:
        """The generated text per example (special tokens dropped), and seconds generating."""
        from peftlab import engine

        o = self.options
        assert o.max_new_tokens is not None
        ids, seconds = engine.generate(
            model,
            features["input_ids"],
            pad_id=tokenizer.pad_token_id,
            eos_ids=end_tokens(tokenizer, model),
            max_new_tokens=o.max_new_tokens,
            batch_size=spec.eval_batch_size or 2 * spec.batch_size,
            precision=precision,
            stop=newline_stop(tokenizer) if o.stop_at_newline else None,
        )
        return tokenizer.batch_decode(ids, skip_special_tokens=True), seconds

    # --- outputs ------------------------------------------------------------------------------
    def final_answer(self, output: str) -> str:
        """The answer in a generated text: its first line (stop_at_newline), or a rationale's final answer."""
        text = output.strip()
        if self.options.target == "rationale":
            found = _FINAL.findall(text)
            lines = [line for line in text.splitlines() if line.strip()]
            text = found[-1] if found else (lines[-1] if lines else "")
            text = text.strip().rstrip(".").strip()
        elif self.options.stop_at_newline:
            text = text.split("\n", 1)[0]
        return _ANSWER_PREFIX.sub("", text).strip()

    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        texts = list(outputs)
        if len(texts) != len(examples):
            raise ValueError(f"{len(texts)} generated texts for {len(examples)} examples")
        return [self._record(example, text) for example, text in zip(examples, texts, strict=True)]

    def _record(self, example: dict[str, Any], output: str) -> Prediction:
        record: Prediction = {
            "id": example["id"],
            "question": example["question"],
            "prediction": self.final_answer(output),
            "reference": list(example["answers"] or []),
        }
        if self.options.target == "rationale":
            record["output"] = output.strip()
        record.update(answer_scores(record["prediction"], record["reference"]))
        return record

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        """Means over the examples that have gold answers; SQuAD's x100 figures as fractions."""
        scored = [p for p in predictions if p.get("reference")]
        texts, golds = [p["prediction"] for p in scored], [p["reference"] for p in scored]
        squad = squad_scores(texts, golds)
        out: dict[str, Any] = {
            "exact_match": squad["exact_match"] / 100,
            "f1": squad["f1"] / 100,
            "contains": _mean(contains_answer(t, g) for t, g in zip(texts, golds, strict=True)),
        }
        numeric = [numeric_match(t, g) for t, g in zip(texts, golds, strict=True)]
        if self.options.metric == "numeric" or (numeric and None not in numeric):
            out["numeric_match"] = _mean(bool(m) for m in numeric)
        out["n"] = len(predictions)
        out["empty_outputs"] = sum(1 for p in predictions if not p["prediction"])
        return out

    def baselines(self, train: Dataset) -> dict[str, Callable[[Dataset], list[Prediction]]]:
        firsts = [answers[0] for answers in train["answers"] if answers]
        most_frequent = Counter(firsts).most_common(1)[0][0] if firsts else ""

        def predict_most_frequent(examples: Dataset) -> list[Prediction]:
            return [self._record(example, most_frequent) for example in examples]

        return {"most frequent training answer": predict_most_frequent}

    # --- probes -------------------------------------------------------------------------------
    def probe_input(self, example: dict[str, Any]) -> str:
        return example["question"]

    def probe_match(self, prediction: Prediction, expected: Any) -> bool:
        """Exact match after SQuAD normalisation, against any of the expected answers."""
        truths = [expected] if isinstance(expected, str) else [str(e) for e in expected]
        return bool(best_over_truths(exact_match_score, prediction["prediction"], truths))


# --- rows -------------------------------------------------------------------------------------


def _text(value: Any, at: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{at}: empty or missing '{key}'")
    return value


def _examples(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A datasets batch (columns) as rows."""
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def parse_answers(given: Any, at: str, key: str) -> list[str]:
    """Gold answers as a list of strings: from a list, one string (or number), or SQuAD's {text: [...]}."""
    if given is None:
        return []
    if isinstance(given, dict):  # SQuAD: {text: [...], answer_start: [...]}
        if "text" not in given:
            raise InputError(f"{at}: '{key}' is a mapping without 'text' (keys: {', '.join(map(str, given))})")
        given = given["text"] or []
    if isinstance(given, str | int | float) and not isinstance(given, bool):
        given = [given]
    if not isinstance(given, list):
        raise InputError(
            f"{at}: '{key}' must be a list of answers, one answer, or {{text: [...]}}; got {type(given).__name__}"
        )
    answers = []
    for n, answer in enumerate(given, 1):
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise InputError(f"{at}: '{key}' answer {n} is {type(answer).__name__}, not text")
        if not str(answer).strip():
            raise InputError(f"{at}: '{key}' answer {n} is empty")
        answers.append(str(answer).strip())
    return answers


# --- tokens -----------------------------------------------------------------------------------


def end_token(tokenizer: Any) -> int:
    """The token that ends an answer: EOS (a chat model's end of turn), else [SEP] (BERT-style vocabularies)."""
    for token in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token is not None:
            return int(token)
    raise InputError("the model's tokenizer has no end token (EOS or SEP): generated answers would never end")


def end_tokens(tokenizer: Any, model: Any) -> list[int]:
    """The answer's end token and the model's own end-of-generation tokens (e.g. Llama 3's several)."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [own] if isinstance(own, int) else list(own or [])
    return list(dict.fromkeys([end_token(tokenizer), *own]))


def newline_stop(tokenizer: Any) -> Callable[[list[int]], bool]:
    """Stop once the generated text has a line break after some text (a leading one does not count)."""

    def stop(ids: list[int]) -> bool:
        return "\n" in tokenizer.decode(ids, skip_special_tokens=True).lstrip()

    return stop


# --- metrics ----------------------------------------------------------------------------------


def parse_number(text: str) -> float | None:
    """A gold answer as a number ("1,234", "-3.5", "$12"), or None when it is not one."""
    cleaned = text.strip().replace(",", "").lstrip("$").rstrip("%").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> float | None:
    """The last number written in a text (thousands separators removed), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(prediction: str, answers: list[str]) -> bool | None:
    """Whether the prediction's last number equals a gold number; None when a gold answer is no number."""
    golds = [parse_number(a) for a in answers]
    if not golds or any(g is None for g in golds):
        return None
    value = last_number(prediction)
    return value is not None and any(math.isclose(value, g, rel_tol=1e-9, abs_tol=1e-9) for g in golds if g is not None)


def contains_answer(prediction: str, answers: list[str]) -> bool:
    """Whether a normalised gold answer occurs, as whole words, in the normalised prediction."""
    text = f" {normalize_answer(prediction)} "
    return any(f" {gold} " in text for gold in map(normalize_answer, answers) if gold)


def answer_scores(prediction: str, answers: list[str]) -> dict[str, Any]:
    """Per-example metrics of a prediction against its gold aliases (none without gold answers)."""
    if not answers:
        return {}
    scores: dict[str, Any] = {
        "exact_match": float(best_over_truths(exact_match_score, prediction, answers)),
        "f1": round(float(best_over_truths(f1_score, prediction, answers)), 4),
        "contains": contains_answer(prediction, answers),
    }
    numeric = numeric_match(prediction, answers)
    if numeric is not None:
        scores["numeric_match"] = numeric
    return scores


def _mean(values: Any) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0
