"""Sequence classification of a text or a text pair (sentiment, NLI, topic, ...).

Labels are names taken from the data (string labels as they are; integer labels through the
dataset's ClassLabel names when it has them, else as their decimal string). The label list is
fitted on train (sorted) unless `labels:` gives it, and is saved with the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from peftlab.errors import InputError
from peftlab.metrics import classification_metrics, softmax_rows
from peftlab.models import ModelSource, instantiate
from peftlab.registry import TASKS
from peftlab.tasks.base import LabelledTask, Prediction, TaskOptions

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from torch import nn


class ClassificationOptions(TaskOptions):
    text_field: str = Field("text", description="the field holding the text")
    text_pair_field: str | None = Field(None, description="a second text (pairs: NLI, paraphrase, ...)")
    label_field: str = Field("label", description="the field holding the label")
    labels: list[str] | None = Field(None, min_length=2, description="label names in order; default: from train")


@TASKS.register("classification")
class Classification(LabelledTask):
    """Text (pair) classification with a sequence-classification head."""

    Options = ClassificationOptions
    peft_task_type = "SEQ_CLS"
    primary_metric = "accuracy"
    higher_is_better: ClassVar[dict[str, bool]] = {"accuracy": True, "macro_f1": True, "loss": False}

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        from datasets import DatasetDict

        canonical = DatasetDict({name: self._canonical(ds, f"{where} [{name}]") for name, ds in splits.items()})
        if self.options.labels is None:
            self.options.labels = sorted(set(canonical["train"]["label"]))
            if len(self.options.labels) < 2:
                raise InputError(f"{where} [train]: only one label ({self.options.labels[0]}); need at least two")
        for name, ds in canonical.items():
            self._check_labels(ds, f"{where} [{name}]")
        return canonical

    def assume_without_data(self) -> str:
        if self.options.labels is not None:
            return f"using task.labels ({len(self.labels)} labels)"
        self.options.labels = ["label_0", "label_1"]
        return "the classification head is counted with 2 labels; set task.labels for the exact count"

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        examples = self._canonical(rows, where, labelled)
        if labelled:
            self._check_labels(examples, where)
        return examples

    def _canonical(self, ds: Dataset, where: str, labelled: bool = True) -> Dataset:
        opts = self.options
        fields = [opts.text_field] + ([opts.label_field] if labelled else [])
        fields += [opts.text_pair_field] if opts.text_pair_field else []
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise InputError(
                f"{where}: no field {', '.join(map(repr, missing))} (fields: {', '.join(ds.column_names)});"
                " set task.text_field / task.label_field / task.text_pair_field"
            )
        has_label = opts.label_field in ds.column_names
        names = getattr(ds.features[opts.label_field], "names", None) if has_label else None
        ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        rows = []
        for i, row in enumerate(ds):
            text = row[opts.text_field]
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{where}: example {ids[i]} (row {i + 1}): empty or missing '{opts.text_field}'")
            label = row[opts.label_field] if has_label else None
            if labelled and (label is None or label == ""):
                raise InputError(f"{where}: example {ids[i]} (row {i + 1}): missing label '{opts.label_field}'")
            if label is not None:
                label = names[label] if names else str(label)
            out = {"id": str(ids[i]), "text": text, "label": label}
            if opts.text_pair_field:
                out["text_pair"] = row[opts.text_pair_field]
            rows.append(out)
        from datasets import Dataset

        return Dataset.from_list(rows)

    def _check_labels(self, ds: Dataset, where: str) -> None:
        unknown = Counter(label for label in ds["label"] if label not in self.labels)
        if unknown:
            raise InputError(
                f"{where}: labels not in the label set {self.labels}: "
                + ", ".join(f"{k!r} ({v} examples)" for k, v in unknown.most_common(5))
            )

    # --- model --------------------------------------------------------------------------------
    def build_model(
        self, source: ModelSource, tokenizer: Any, *, weights: bool = True, **load_kwargs: Any
    ) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return instantiate(
            AutoModelForSequenceClassification,
            source,
            tokenizer=tokenizer,
            weights=weights,
            **self.label_config(),
            **load_kwargs,
        )

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        label_ids = {label: i for i, label in enumerate(self.labels)}
        pair = "text_pair" in examples.column_names

        def encode(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True, max_length=max_length)
            if all(label is not None for label in batch["label"]):
                enc["labels"] = [label_ids[label] for label in batch["label"]]
            return dict(enc)

        return examples.map(encode, batched=True, remove_columns=examples.column_names)

    # --- outputs ------------------------------------------------------------------------------
    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        probs = softmax_rows(outputs)
        return [
            {
                "id": ex["id"],
                "text": ex["text"],
                "label": ex["label"],
                "prediction": self.labels[int(p.argmax())],
                "probs": {label: round(float(v), 5) for label, v in zip(self.labels, p, strict=True)},
            }
            for ex, p in zip(examples, probs, strict=True)
        ]

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        return classification_metrics(
            [p["label"] for p in predictions], [p["prediction"] for p in predictions], self.labels
        )

    def baselines(self, train: Dataset) -> dict[str, Callable[[Dataset], list[Prediction]]]:
        majority = Counter(train["label"]).most_common(1)[0][0]

        def predict_majority(examples: Dataset) -> list[Prediction]:
            return [{"id": ex["id"], "label": ex["label"], "prediction": majority} for ex in examples]

        return {"majority class": predict_majority}
