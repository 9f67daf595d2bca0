"""What every task provides: data normalisation, the model and its head, features, outputs, metrics.

The engine knows nothing about tasks: it trains on `featurize` output with `collator` and returns
the model's raw outputs; the task turns those into per-example predictions (`predict`) and scores
them (`score`). A task's options (its own schema, `Options`) are also its saved state: fitted values
such as the label list are written back into them, so a run can rebuild its task from config.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # the heavy libraries load when a task works, not when a config is validated
    from datasets import Dataset, DatasetDict
    from torch import nn

    from peftlab.models import ModelSource

Prediction = dict[str, Any]


class TaskOptions(BaseModel):
    """Base of each task's options schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Task:
    """Base class of the registered tasks (see tasks/classification.py)."""

    Options: ClassVar[type[TaskOptions]] = TaskOptions
    peft_task_type: ClassVar[str | None]  # None: PEFT has no task type for it (a plain PeftModel)
    primary_metric: ClassVar[str]
    # metric name -> True when higher is better (used for sweeps, early stopping, report colouring);
    # these are also the scalar metrics logged on the validation split after each epoch
    higher_is_better: ClassVar[dict[str, bool]] = {}
    # data.max_length when the experiment does not set it (tokens per sequence, or per window)
    default_max_length: ClassVar[int] = 128
    # the metrics a multi-task summary table shows for this task (default: the primary metric)
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    # what a perfect score is: 1.0 for fractions, 100.0 for tasks that report x100 as their field does
    # (QA, like the official SQuAD script); tables that compare tasks put every score on one scale
    score_scale: ClassVar[float] = 1.0
    # columns of `featurize` output that are bookkeeping for `predict` (e.g. which example a window
    # belongs to, character offsets), not model inputs: `model_inputs` drops them for the Trainer
    bookkeeping_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        self.options = self.Options.model_validate(options)

    def state(self) -> dict[str, Any]:
        """Options including fitted values: enough to rebuild this task for eval/predict."""
        return self.options.model_dump()

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        """Validate raw rows and map them to the task's canonical fields; fit labels on train."""
        raise NotImplementedError

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        """Canonical examples from raw rows of a new file (eval, predict), with the fitted labels.

        labelled=False (predict) accepts rows without a reference answer or label.
        """
        raise NotImplementedError

    def needs_data_to_build(self) -> bool:
        """Whether the model's size depends on the data (e.g. the label count); `plan` reads it only then."""
        return True

    def assume_without_data(self) -> str:
        """For `plan` when the data cannot be read: assume what sizes the head; say what was assumed."""
        return "the task needs no data to size its model"

    # --- model --------------------------------------------------------------------------------
    def build_model(
        self, source: ModelSource, tokenizer: Any, *, weights: bool = True, **load_kwargs: Any
    ) -> nn.Module:
        raise NotImplementedError

    def head_modules(self, model: nn.Module) -> list[str]:
        """Modules outside the pretrained backbone (the freshly initialised task head).

        They are trained and saved by every method: a frozen random head would cripple PEFT runs.
        The default takes the task model's children that have parameters, other than the backbone
        (transformers names it `base_model_prefix`: bert, distilbert, model, ...).
        """
        backbone = getattr(model, "base_model_prefix", "")
        return [
            name for name, child in model.named_children() if name != backbone and any(True for _ in child.parameters())
        ]

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Model inputs (and labels), plus the task's `bookkeeping_columns` for `predict`."""
        raise NotImplementedError

    def predict_features(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Model inputs for prediction. Default: featurize's rows. A task whose prediction needs other
        rows (e.g. one row per candidate answer, scored by likelihood) returns those instead."""
        return self.featurize(examples, tokenizer, max_length)

    # Optional, per batch during prediction: (raw logits, labels) -> what is kept of them. A causal LM's
    # logits are vocabulary-sized per position; a task that needs a few numbers of them reduces them
    # here instead of letting every batch's logits pile up (the Trainer's preprocess_logits_for_metrics).
    reduce_outputs: Callable[[Any, Any], Any] | None = None

    @property
    def scores_training_rows(self) -> bool:
        """Whether `predict` can score `featurize`'s validation rows (the per-epoch validation metrics).
        False for a task whose prediction needs its own rows (e.g. one per candidate answer)."""
        return True

    def model_outputs(
        self, model: nn.Module, features: Dataset, tokenizer: Any, spec: Any, precision: str
    ) -> tuple[Any, float]:
        """The model's raw outputs on `predict_features` rows (what `predict` reads), and seconds.

        Default: batched forward passes (engine.predict, through the Trainer), each batch shrunk by
        `reduce_outputs`. A task whose outputs are not one forward pass (generated text) overrides it.
        """
        from peftlab import engine

        inputs = self.model_inputs(features)
        collator = self.collator(tokenizer)
        return engine.predict(model, inputs, collator, spec, precision=precision, reduce=self.reduce_outputs)

    def model_inputs(self, features: Dataset) -> Dataset:
        """The featurized rows without bookkeeping columns: exactly what the Trainer receives."""
        drop = [c for c in self.bookkeeping_columns if c in features.column_names]
        return features.remove_columns(drop) if drop else features

    def collator(self, tokenizer: Any) -> Callable:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    # --- outputs ------------------------------------------------------------------------------
    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        """One prediction record per example (id, prediction, reference, ...)."""
        raise NotImplementedError

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        """Metrics of a list of prediction records."""
        raise NotImplementedError

    def baselines(self, train: Dataset) -> dict[str, Callable[[Dataset], list[Prediction]]]:
        """Model-free baselines fitted on train: name -> function(examples) -> predictions."""
        return {}

    # --- probes (`peftlab probe`: the same examples through several runs, side by side) ----------
    def probe_input(self, example: dict[str, Any]) -> str:
        """The short text that stands for an example in the probe table (the question, the text)."""
        return str(example.get("text", example.get("id", "")))

    def probe_answer(self, prediction: Prediction) -> str:
        """A prediction as the probe table shows it."""
        return str(prediction.get("prediction", ""))

    def probe_match(self, prediction: Prediction, expected: Any) -> bool:
        """Whether a prediction matches the expected answer an examples file gives."""
        return str(prediction.get("prediction")) == str(expected)


class LabelledTask(Task):
    """A task with a label set in `options.labels`: given in the file, or fitted on train in `prepare`."""

    @property
    def labels(self) -> list[str]:
        labels = getattr(self.options, "labels", None)
        if labels is None:
            raise RuntimeError("labels are fitted in prepare()")
        return labels

    def label_config(self) -> dict[str, Any]:
        """The model configuration entries of the label set (head size and label names)."""
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {label: i for i, label in enumerate(self.labels)},
        }
