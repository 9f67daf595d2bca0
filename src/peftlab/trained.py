"""A finished run, rebuilt from its folder: for `eval`, `predict`, `probe` and reload checks.

The run's config.yaml holds everything needed: the model source, the task with its fitted state
(e.g. labels), the method and its settings, and the training settings (seed, precision). The
base model is rebuilt under the run's seed (so random-weight test models come back identical) and
the method loads what training saved into adapter/.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from peftlab import engine
from peftlab.config import DataSpec, ExtraEvalSpec, TrainSpec
from peftlab.data.loading import load_rows, sample
from peftlab.errors import InputError
from peftlab.methods import Method, method_from_config
from peftlab.models import ModelSource, ensure_pad_token, resolve_model
from peftlab.store import RunDir
from peftlab.tasks import Prediction, Task, task_from_config


@dataclass
class TrainedRun:
    folder: RunDir
    config: dict[str, Any]
    task: Task
    source: ModelSource
    tokenizer: Any
    model: Any
    train: TrainSpec
    precision: str
    method: Method
    build_base: Callable[[], Any]  # the base model the run started from (e.g. for `analyze`)

    @property
    def max_length(self) -> int:
        return int(self.config["data"]["max_length"])

    def predict(self, examples: Dataset) -> list[Prediction]:
        """Predictions for canonical examples, exactly as the run's own evaluation made them."""
        features = self.task.predict_features(examples, self.tokenizer, self.max_length)
        outputs, _ = self.task.model_outputs(self.model, features, self.tokenizer, self.train, self.precision)
        return self.task.predict(outputs, examples, features)


def load_run(path: Path | str, *, base_kwargs: bool = True) -> TrainedRun:
    """Rebuild a finished run's trained model; InputError when the folder is not a finished run.

    base_kwargs=False builds the base without the method's from_pretrained options (QLoRA's 4-bit
    weights): the adapter on a full-precision base, as `export --merge` needs it."""
    from transformers import AutoTokenizer, set_seed

    folder = RunDir(Path(path))
    if problem := folder.unfinished():
        raise InputError(f"{path}: {problem}")
    config = folder.config()
    task = task_from_config(config["task"])
    source = resolve_model(config["model"])
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(folder.adapter_dir))
    train = TrainSpec.model_validate(config["train"])
    method = method_from_config(config)

    def build(saved: str | None) -> Any:
        set_seed(train.seed)
        if saved is None:
            return task.build_model(source, tokenizer, **(method.load_kwargs() if base_kwargs else {}))
        return task.build_model(resolve_model(saved), tokenizer)

    model = method.load(build, folder.adapter_dir)
    model.eval()
    precision = engine.resolve_precision(train.precision)
    return TrainedRun(folder, config, task, source, tokenizer, model, train, precision, method, lambda: build(None))


def examples_for(run: TrainedRun, data: str, split: str | None, labelled: bool = True) -> tuple[Dataset, str]:
    """Canonical examples from a file, folder, asset or hub dataset, using the run's task settings."""
    spec = DataSpec(source=data, max_length=run.max_length)
    rows, where = load_rows(spec, split)
    return run.task.examples_from_rows(rows, where, labelled=labelled), where


def read_extra(task: Task, extra: ExtraEvalSpec, seed: int, base_dir: Path | None = None) -> Dataset:
    """More evaluation data (`evaluate.extra`) read with the task's fitted labels, at most `extra.limit`
    of it (a seeded sample): the same rows for training-time evaluation and for `analyze` later."""
    rows, where = load_rows(DataSpec(source=extra.source, config_name=extra.config_name), extra.split, base_dir)
    examples = task.examples_from_rows(rows, where)
    return examples if extra.limit is None else sample(examples, extra.limit, seed)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "data"
