"""Multiple choice: pick the right ending of a context among N candidates (SWAG and the like).

Inputs: the hub's `swag` (`sent1` context, `sent2` start of the ending, `ending0..3`, `label`), local
files in the same shape, or rows with `context`, an optional `start`, a list `endings` and `label`
(the index of the right ending), like the offline `hellaswag` and `rotten-tomatoes-mc` assets; or
exam-style rows with `question`, a list `choices` and `label` (the `mmlu`, `medmcqa`, `arc-*` assets).

Each candidate is encoded as the pair (context, start + ending); the model scores every pair and
the highest score wins (transformers' *ForMultipleChoice heads). Every item must have the same
number of endings (fitted on train, or `num_choices`); a label outside 0..N-1, a differing number
of endings or an empty ending is an error naming the item. Pairs longer than `max_length` are
truncated (longest first) and counted per split (`n_truncated`).

Baselines (model-free, fitted on train) are the cues a careless data set gives away: the longest or
shortest ending, the ending with the most or least word overlap with the context, the ending
whose final punctuation is most often right, and the most frequent answer position. On a sound
set they score about chance (1/N).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, PositiveInt

from peftlab.data.cues import accuracy, cue_baselines
from peftlab.errors import InputError
from peftlab.metrics import softmax_rows
from peftlab.models import ModelSource, instantiate
from peftlab.registry import TASKS
from peftlab.tasks.base import Prediction, Task, TaskOptions

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from torch import nn


class MultipleChoiceOptions(TaskOptions):
    context_field: str | None = Field(None, description="the context; default: context, then sent1, then question")
    start_field: str | None = Field(None, description="start of every ending; default: start, then sent2 (optional)")
    endings_field: str | None = Field(
        None, description="a list of endings; default: endings, then choices, then ending0, ending1, ..."
    )
    label_field: str = Field("label", description="index of the right ending")
    num_choices: PositiveInt | None = Field(None, ge=2, description="endings per item; default: from train")


@TASKS.register("multiple_choice")
class MultipleChoice(Task):
    """N-way multiple choice with a *ForMultipleChoice head."""

    Options = MultipleChoiceOptions
    peft_task_type = None  # PEFT has no multiple-choice type; a plain PeftModel passes inputs through
    primary_metric = "accuracy"
    higher_is_better: ClassVar[dict[str, bool]] = {"accuracy": True}
    headline_metrics = ("accuracy",)
    bookkeeping_columns = ("truncated",)

    @property
    def num_choices(self) -> int:
        if self.options.num_choices is None:
            raise RuntimeError("num_choices is fitted in prepare()")
        return self.options.num_choices

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        from datasets import DatasetDict

        return DatasetDict({name: self._canonical(ds, f"{where} [{name}]") for name, ds in splits.items()})

    def needs_data_to_build(self) -> bool:
        return False  # one score per ending, whatever the number of endings

    def assume_without_data(self) -> str:
        return "the multiple-choice head has one output whatever the number of endings"

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        return self._canonical(rows, where, labelled)

    def _fields(self, ds: Dataset, where: str, labelled: bool) -> tuple[str, str | None, list[str] | str]:
        """(context field, start field or None, the endings list field or the ending0..N fields)."""
        cols = ds.column_names
        opts = self.options

        def first(given: str | None, defaults: Sequence[str], what: str, required: bool = True) -> str | None:
            if given is not None:
                if given not in cols:
                    raise InputError(f"{where}: no field '{given}' (task.{what}); fields: {', '.join(cols)}")
                return given
            found = next((f for f in defaults if f in cols), None)
            if found is None and required:
                raise InputError(
                    f"{where}: no {' or '.join(map(repr, defaults))} field (fields: {', '.join(cols)}); set task.{what}"
                )
            return found

        context = first(opts.context_field, ("context", "sent1", "question"), "context_field")
        start = first(opts.start_field, ("start", "sent2"), "start_field", required=False)
        numbered = sorted((f for f in cols if re.fullmatch(r"ending\d+", f)), key=lambda f: int(f[6:]))
        endings: list[str] | str | None = first(
            opts.endings_field, ("endings", "choices"), "endings_field", required=not numbered
        )
        if labelled and opts.label_field not in cols:
            raise InputError(
                f"{where}: no field '{opts.label_field}' (fields: {', '.join(cols)}); set task.label_field"
            )
        assert context is not None
        return context, start, endings if endings is not None else numbered

    def _canonical(self, ds: Dataset, where: str, labelled: bool = True) -> Dataset:
        context_f, start_f, endings_f = self._fields(ds, where, labelled)
        ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        has_label = self.options.label_field in ds.column_names
        rows = []
        for i, row in enumerate(ds):
            ref = f"{where}: item {ids[i]} (row {i + 1})"
            endings = row[endings_f] if isinstance(endings_f, str) else [row[f] for f in endings_f]
            context = row[context_f]
            if not isinstance(context, str) or not context.strip():
                raise InputError(f"{ref}: empty or missing context '{context_f}'")
            if not isinstance(endings, list) or not all(isinstance(e, str) and e.strip() for e in endings):
                raise InputError(f"{ref}: endings must be a list of non-empty texts")
            if self.options.num_choices is None:
                self.options.num_choices = len(endings)
                if len(endings) < 2:
                    raise InputError(f"{ref}: {len(endings)} ending; multiple choice needs at least 2")
            if len(endings) != self.num_choices:
                raise InputError(
                    f"{ref}: {len(endings)} endings, but items have {self.num_choices} "
                    "(every item needs the same number; task.num_choices sets it)"
                )
            label = self._label(row.get(self.options.label_field) if has_label else None, ref, labelled)
            start = (row.get(start_f) or "") if start_f else ""
            rows.append({"id": str(ids[i]), "context": context, "start": start, "endings": endings, "label": label})
        from datasets import Dataset

        return Dataset.from_list(rows)

    def _label(self, value: Any, ref: str, labelled: bool) -> int | None:
        if value is None or value == "":
            if labelled:
                raise InputError(f"{ref}: missing label '{self.options.label_field}'")
            return None
        try:
            label = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{ref}: label {value!r} is not an ending index") from None
        if not 0 <= label < self.num_choices:
            raise InputError(f"{ref}: label {label} is out of range: expected 0..{self.num_choices - 1}")
        return label

    # --- model --------------------------------------------------------------------------------
    def build_model(
        self, source: ModelSource, tokenizer: Any, *, weights: bool = True, **load_kwargs: Any
    ) -> nn.Module:
        from transformers import AutoModelForMultipleChoice

        return instantiate(AutoModelForMultipleChoice, source, tokenizer=tokenizer, weights=weights, **load_kwargs)

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Per item: N encodings of (context, start + ending), the label, and whether one was truncated."""
        n = self.num_choices

        def encode(batch: dict[str, list]) -> dict[str, list]:
            first = [context for context in batch["context"] for _ in range(n)]
            second = [
                f"{start} {ending}".strip()
                for start, endings in zip(batch["start"], batch["endings"], strict=True)
                for ending in endings
            ]
            full = tokenizer(first, second)["input_ids"]
            enc = tokenizer(first, second, truncation=True, max_length=max_length)
            out = {key: [values[i : i + n] for i in range(0, len(values), n)] for key, values in enc.items()}
            out["truncated"] = [any(len(ids) > max_length for ids in full[i : i + n]) for i in range(0, len(full), n)]
            if all(label is not None for label in batch["label"]):
                out["labels"] = list(batch["label"])
            return out

        return examples.map(encode, batched=True, remove_columns=examples.column_names)

    def collator(self, tokenizer: Any) -> Callable:
        return _ChoiceCollator(tokenizer)

    # --- outputs ------------------------------------------------------------------------------
    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        probs = softmax_rows(outputs)
        return [
            {
                "id": ex["id"],
                "context": ex["context"],
                "endings": ex["endings"],
                "label": ex["label"],
                "prediction": int(p.argmax()),
                "probs": [round(float(v), 5) for v in p],
                "truncated": bool(cut),
            }
            for ex, p, cut in zip(examples, probs, features["truncated"], strict=True)
        ]

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        return {
            "accuracy": accuracy(predictions),
            "n": len(predictions),
            "n_truncated": sum(1 for p in predictions if p.get("truncated")),
        }

    def baselines(self, train: Dataset) -> dict[str, Callable[[Dataset], list[Prediction]]]:
        return cue_baselines(train)


class _ChoiceCollator:
    """Pads the N encodings of every item to one length and stacks them [batch, N, length].

    transformers' DataCollatorForMultipleChoice does the same but requires labels; `predict` has none.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = len(features[0]["input_ids"])
        flat = [{k: v[i] for k, v in f.items() if k != "labels"} for f in features for i in range(n)]
        batch = self.tokenizer.pad(flat, padding=True, return_tensors="pt")
        out = {k: v.view(len(features), n, -1) for k, v in batch.items()}
        if "labels" in features[0]:
            out["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return out
