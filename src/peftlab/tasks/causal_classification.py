"""Classification with a causal language model: a prompt, one verbalizer per label, log-likelihood scoring.

Each example becomes a prompt (the tokenizer's chat template wraps it when it has one) followed by
an answer. Prediction scores every label's verbalizer tokens by their log-likelihood after the
prompt and picks the most likely label; nothing is generated or parsed. Training is ordinary
next-token training with the loss on the gold verbalizer's tokens only (the prompt is masked).

Two scoring layouts, both exact:
  - every verbalizer is one token: one row per example (the prompt); the next-token
    log-probabilities at its last position give every label's score at once;
  - otherwise: one row per (example, label), prompt + that label's verbalizer; the score is the sum
    (or, with `score: mean`, the mean) of the verbalizer tokens' log-probabilities.
Rows are left-padded so that the answer is always at the end: the model then computes its
vocabulary projection only for the last few positions (`logits_to_keep`), which is most of the
cost of a small LM's forward pass with a 50k-128k vocabulary.

`head: linear` instead puts a sequence-classification head on the same prompt (for comparison).
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from peftlab.errors import InputError
from peftlab.models import ModelSource, instantiate
from peftlab.registry import TASKS
from peftlab.tasks.base import Prediction
from peftlab.tasks.classification import Classification, ClassificationOptions
from peftlab.tasks.lm_prompt import TEMPLATE_DATE, shorten_to_fit

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from torch import nn

DEFAULT_PROMPT = "{text}\n\nWhich of these labels fits the text above: {labels}?\nAnswer:"
PLACEHOLDER = re.compile(r"\{(text|text_pair)\}")
IGNORE = -100  # the label id the loss ignores (PyTorch's cross_entropy default)


class CausalClassificationOptions(ClassificationOptions):
    prompt: str = Field(
        DEFAULT_PROMPT,
        description="the prompt: {text} is replaced by the example's text ({text_pair} by the second text, "
        "{labels} by the verbalizers)",
    )
    verbalizers: dict[str, str] | None = Field(
        None, description="label -> the answer text scored for it; default: the label name itself"
    )
    chat_template: bool | Literal["auto"] = Field(
        "auto", description="wrap the prompt in the tokenizer's chat template (auto: when it has one)"
    )
    system_prompt: str | None = Field(None, description="a system message for the chat template")
    head: Literal["lm", "linear"] = Field(
        "lm", description="lm: score the verbalizers with the LM head; linear: a sequence-classification head"
    )
    score: Literal["sum", "mean"] = Field(
        "sum", description="a label's score: the sum of its tokens' log-probabilities, or their mean"
    )

    @model_validator(mode="after")
    def _check(self) -> CausalClassificationOptions:
        if "{text}" not in self.prompt:
            raise ValueError("the prompt has no {text} placeholder: it would show the model no example")
        if self.text_pair_field and "{text_pair}" not in self.prompt:
            raise ValueError("text_pair_field is set but the prompt has no {text_pair} placeholder")
        if self.verbalizers is not None:
            check_verbalizers(self.verbalizers, self.labels)
            if self.labels is None:  # the verbalizers name the label set (in their order)
                if len(self.verbalizers) < 2:
                    raise ValueError("verbalizers: need at least two labels")
                self.labels = list(self.verbalizers)
        return self


def check_verbalizers(verbalizers: dict[str, str], labels: list[str] | None) -> None:
    """Every verbalizer non-empty and different from the others; every label has one."""
    empty = [label for label, text in verbalizers.items() if not text.strip()]
    if empty:
        raise ValueError(f"empty verbalizer for label(s) {', '.join(map(repr, empty))}")
    seen: dict[str, str] = {}
    for label, text in verbalizers.items():
        key = text.strip()
        if key in seen:
            raise ValueError(f"labels {seen[key]!r} and {label!r} have the same verbalizer {key!r}")
        seen[key] = label
    missing = [label for label in labels or [] if label not in verbalizers]
    if missing:
        raise ValueError(f"no verbalizer for label(s) {', '.join(map(repr, missing))}")


@TASKS.register("causal_classification")
class CausalClassification(Classification):
    """Text classification by a causal LM: verbalizer log-likelihoods, or a linear head on the prompt."""

    Options = CausalClassificationOptions
    options: CausalClassificationOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._encoded: _Encoder | None = None
        self._keeps_logits = True

    @property
    def peft_task_type(self) -> str:  # type: ignore[override]
        return "CAUSAL_LM" if self.options.head == "lm" else "SEQ_CLS"

    def verbalizer(self, label: str) -> str:
        return (self.options.verbalizers or {}).get(label, label)

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        canonical = super().prepare(splits, where)
        if self.options.verbalizers is None:  # the label names are the verbalizers: they must differ
            try:
                check_verbalizers({label: label for label in self.labels}, self.labels)
            except ValueError as exc:
                raise InputError(f"{where}: {exc}; set task.verbalizers") from None
        return canonical

    def _check_labels(self, ds: Dataset, where: str) -> None:
        """A label in the data without a verbalizer is named as such (not just 'not in the label set')."""
        verbalizers = self.options.verbalizers
        missing = Counter(label for label in ds["label"] if verbalizers is not None and label not in verbalizers)
        if missing:
            raise InputError(
                f"{where}: label(s) with no verbalizer in task.verbalizers: "
                + ", ".join(f"{k!r} ({v} examples)" for k, v in missing.most_common(5))
            )
        super()._check_labels(ds, where)

    # --- model --------------------------------------------------------------------------------
    def build_model(
        self, source: ModelSource, tokenizer: Any, *, weights: bool = True, **load_kwargs: Any
    ) -> nn.Module:
        if self.options.head == "linear":
            return super().build_model(source, tokenizer, weights=weights, **load_kwargs)
        from transformers import AutoModelForCausalLM

        model = instantiate(AutoModelForCausalLM, source, tokenizer=tokenizer, weights=weights, **load_kwargs)
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        return model

    def head_modules(self, model: nn.Module) -> list[str]:
        """The LM head is pretrained (and usually tied to the input embeddings): not a task head."""
        return [] if self.options.head == "lm" else super().head_modules(model)

    # --- features -----------------------------------------------------------------------------
    def encoder(self, tokenizer: Any) -> _Encoder:
        """Prompt and verbalizer tokenization for this tokenizer (built once, checked once)."""
        if self._encoded is None or self._encoded.tokenizer is not tokenizer:
            self._encoded = _Encoder(self, tokenizer)
        return self._encoded

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Training rows: prompt + gold verbalizer, the loss on the verbalizer only (head: lm)."""
        enc = self.encoder(tokenizer)
        label_ids = {label: i for i, label in enumerate(self.labels)}

        def rows(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": []}
            for i, label in enumerate(batch["label"]):
                prompt = enc.prompt_ids(batch["text"][i], _pair(batch, i), max_length)
                if self.options.head == "linear":
                    out["input_ids"].append(prompt)
                    out["labels"].append(label_ids[label] if label is not None else IGNORE)
                    continue
                answer = enc.answers[label] if label is not None else []
                out["input_ids"].append(prompt + answer)
                out["labels"].append([IGNORE] * len(prompt) + answer)
            return out

        return examples.map(rows, batched=True, remove_columns=examples.column_names)

    def predict_features(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Scoring rows: the prompt alone (one-token verbalizers) or one row per (example, label)."""
        enc = self.encoder(tokenizer)
        if self.options.head == "linear":
            return self.featurize(examples, tokenizer, max_length)

        def rows(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": []}
            for i in range(len(batch["text"])):
                prompt = enc.prompt_ids(batch["text"][i], _pair(batch, i), max_length)
                if enc.single_token:
                    out["input_ids"].append(prompt)
                    out["labels"].append([IGNORE] * len(prompt))
                    continue
                for label in self.labels:
                    answer = enc.answers[label]
                    out["input_ids"].append(prompt + answer)
                    out["labels"].append([IGNORE] * len(prompt) + answer)
            return out

        return examples.map(rows, batched=True, remove_columns=examples.column_names)

    def collator(self, tokenizer: Any) -> Callable:
        return LeftPadCollator(tokenizer.pad_token_id, lm=self.options.head == "lm", keep=lambda: self._keeps_logits)

    # --- outputs ------------------------------------------------------------------------------
    def reduce_outputs(self, logits: Any, labels: Any) -> torch.Tensor:  # type: ignore[override]
        """Per batch, during prediction: the vocabulary-sized logits -> one score per label (or row)."""
        import torch

        if self.options.head == "linear":
            return logits
        logits = logits[0] if isinstance(logits, tuple) else logits
        enc = self._encoded
        assert enc is not None, "featurize/predict_features run before prediction"
        if enc.single_token:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logprobs = torch.log_softmax(logits[rows, answer_position(logits, labels)].float(), dim=-1)
            return logprobs[:, enc.first_tokens.to(logprobs.device)]
        return answer_logprob(logits, labels, mean=self.options.score == "mean")

    @property
    def scores_training_rows(self) -> bool:  # type: ignore[override]
        """One-token verbalizers: the training rows score every label (the position before the answer)."""
        return self.options.head == "linear" or (self._encoded is not None and self._encoded.single_token)

    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        if self.options.head == "linear":
            return super().predict(outputs, examples, features)
        scores = np.asarray(outputs, dtype=np.float64).reshape(len(examples), len(self.labels))
        records = super().predict(scores, examples, features)  # probs: softmax of the log-likelihoods
        for record, row in zip(records, scores, strict=True):
            record["loglik"] = {label: round(float(v), 5) for label, v in zip(self.labels, row, strict=True)}
        return records


def _pair(batch: dict[str, list], i: int) -> str | None:
    return batch["text_pair"][i] if "text_pair" in batch else None


def answer_position(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per row, the position (in `logits`) whose next-token distribution is the answer's first token:
    the one before the first label token, or the last position of a prompt-only row."""
    import torch

    last = torch.full((logits.shape[0],), logits.shape[1] - 1, device=logits.device)
    if labels is None:
        return last
    answered = labels[:, -logits.shape[1] :].to(logits.device) != IGNORE
    first = answered.int().argmax(dim=1) - 1
    return torch.where(answered.any(dim=1), first, last)


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of log p(label token | everything before it) over each row's non-ignored labels.

    `logits` may cover only the last positions (logits_to_keep): they are aligned with the end of
    `labels`. Token t is predicted by the logits at position t - 1.
    """
    import torch

    labels = labels[:, -logits.shape[1] :].to(logits.device)
    logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    total = picked.sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if mean else total


class _Encoder:
    """The prompt as text around the example's text, and each label's answer tokens."""

    def __init__(self, task: CausalClassification, tokenizer: Any) -> None:
        import torch

        self.tokenizer = tokenizer
        opts = task.options
        verbalizers = [task.verbalizer(label).strip() for label in task.labels]
        shown = ", ".join(verbalizers[:-1]) + f" or {verbalizers[-1]}" if len(verbalizers) > 1 else verbalizers[0]
        prompt = opts.prompt.replace("{labels}", shown)
        self.chat = self._use_chat(opts.chat_template)
        if self.chat:
            messages = [{"role": "system", "content": opts.system_prompt}] if opts.system_prompt else []
            messages.append({"role": "user", "content": prompt})
            self.template = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, date_string=TEMPLATE_DATE
            )
            separator = ""
        else:
            self.template = prompt
            separator = "" if prompt[-1:].isspace() else " "
        self.answers = {
            label: tokenizer(separator + task.verbalizer(label).strip(), add_special_tokens=False)["input_ids"]
            for label in task.labels
        }
        self._check_answers()
        self.single_token = all(len(ids) == 1 for ids in self.answers.values())
        self.first_tokens = torch.tensor([ids[0] for ids in self.answers.values()])
        self.answer_room = max(len(ids) for ids in self.answers.values())
        self._end_ids = {tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}

    def _use_chat(self, setting: bool | str) -> bool:
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if setting is True and not has:
            raise InputError("task.chat_template: true, but the model's tokenizer has no chat template")
        return has if setting == "auto" else bool(setting)

    def _check_answers(self) -> None:
        """Distinct verbalizers can still tokenize identically (case folding, unknown tokens)."""
        seen: dict[tuple[int, ...], str] = {}
        for label, ids in self.answers.items():
            if not ids:
                raise InputError(f"task.verbalizers: the verbalizer of {label!r} has no tokens")
            if tuple(ids) in seen:
                raise InputError(
                    f"task.verbalizers: {seen[tuple(ids)]!r} and {label!r} give the same tokens {ids} "
                    "with this tokenizer; choose verbalizers that differ"
                )
            seen[tuple(ids)] = label

    def render(self, text: str, pair: str | None) -> str:
        values = {"text": text, "text_pair": pair or ""}
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)

    def encode(self, text: str, pair: str | None) -> list[int]:
        if self.chat:  # the template already holds the special tokens as text
            return self.tokenizer(self.render(text, pair), add_special_tokens=False)["input_ids"]
        ids = self.tokenizer(self.render(text, pair))["input_ids"]
        while ids and ids[-1] in self._end_ids:  # keep a leading BOS, drop end markers ([SEP], EOS)
            ids = ids[:-1]
        return ids

    def prompt_ids(self, text: str, pair: str | None, max_length: int) -> list[int]:
        """The prompt's tokens, shortening the example's text (not the prompt) to leave room for the answer."""
        budget = max_length - self.answer_room
        ids = shorten_to_fit(lambda t: self.encode(t, pair), self.tokenizer, text, budget)
        if len(ids) > budget:
            raise InputError(
                f"data.max_length: {max_length} tokens leave no room for the text: the prompt alone takes "
                f"{len(self.encode('', pair))} tokens and the longest answer {self.answer_room}"
            )
        return ids


class LeftPadCollator:
    """Left-pads rows so that answers end every row; passes position ids and `logits_to_keep`.

    Position ids count real tokens only, so a row's scores do not depend on how much padding its
    batch needed. With an LM head only the last k positions get logits (k = the longest answer + 1),
    and labels are cut to the same positions, as the model's loss expects.
    """

    def __init__(self, pad_id: int, *, lm: bool, keep: Callable[[], bool]) -> None:
        self.pad_id = pad_id
        self.lm = lm
        self.keep = keep

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, width - n :] = torch.tensor(row["input_ids"], dtype=torch.long)
            mask[i, width - n :] = 1
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
            "use_cache": False,
        }
        if not self.lm:
            if any(r.get("labels", IGNORE) != IGNORE for r in rows):
                batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
            return batch
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, width - len(row["labels"]) :] = torch.tensor(row["labels"], dtype=torch.long)
        answered = (labels != IGNORE).any(dim=0).nonzero()
        keep = width - int(answered[0]) + 1 if len(answered) else 1
        if self.keep():
            batch["logits_to_keep"] = keep
            labels = labels[:, -keep:]
        if (labels != IGNORE).any():
            batch["labels"] = labels
        return batch
