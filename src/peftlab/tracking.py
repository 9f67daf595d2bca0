"""Experiment trackers (`train.report_to`): the Trainer's own integrations, pointed at the run folder.

Each run is logged under its run name with its resolved settings (config.yaml, flattened to dotted keys)
as hyperparameters; the training loss every `train.log_every` steps and the validation metrics every
epoch are the Trainer's logs. Where they write, offline by default:

- tensorboard: `<run>/tb/` (`tensorboard --logdir runs/<experiment>` shows every run by its folder);
- mlflow: a local file store `runs/<experiment>/mlruns` (MLFLOW_TRACKING_URI unless set; MLflow 3 wants
  MLFLOW_ALLOW_FILE_STORE=true for it, which is then set too), in an MLflow experiment named after the
  experiment (MLFLOW_EXPERIMENT_NAME unless set); `mlflow ui --backend-store-uri runs/<experiment>/mlruns`;
- wandb: the W&B project named after the experiment (WANDB_PROJECT unless set), files under the run
  folder (WANDB_DIR unless set); WANDB_MODE=offline keeps it off the network.

Importing this module imports no tracker library (config validation reads TRACKERS).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import InputError


@dataclass(frozen=True)
class Tracker:
    module: str  # what must be importable
    extra: str  # pip install "peftlab[<extra>]"


TRACKERS = {
    "tensorboard": Tracker("tensorboard", "tensorboard"),
    "mlflow": Tracker("mlflow", "mlflow"),
    "wandb": Tracker("wandb", "wandb"),
}
PREFIX = "peftlab."  # the run's settings among the Trainer's own parameters (MLflow refuses a key logged twice)


def check_installed(names: Sequence[str], key: str = "train.report_to") -> None:
    """InputError (exit 2) naming `key` and the pip extra when a tracker's library is not installed."""
    for name in names:
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.module) is None:
            raise InputError(
                f"{key}: {name} is not installed; install it with: pip install 'peftlab[{tracker.extra}]' "
                f"(or remove {name} from {key})"
            )


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested settings -> {dotted.key: scalar}; lists, None and empty mappings as JSON text."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str, ensure_ascii=False)
    return out


def experiment_dir(run_path: Path) -> Path:
    """runs/<experiment>/ of a run folder (a sweep point's is two levels up), by its experiment.yaml."""
    for folder in run_path.parents[:2]:
        if (folder / "experiment.yaml").exists():
            return folder
    return run_path.parent


@contextlib.contextmanager
def session(
    trainer: Any, names: Sequence[str], run_path: Path, settings: dict[str, Any], log: Callable[[str], None]
) -> Iterator[None]:
    """While the block trains: the trackers write where the module docstring says, and log the settings."""
    if not names:
        yield
        return
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(run_path / "tb")
    trainer.add_callback(_settings_callback(trainer.callback_handler.callbacks, settings, log))
    folder = experiment_dir(run_path)
    experiment = str(settings.get("experiment") or folder.name)
    defaults: dict[str, str] = {}
    if "mlflow" in names:
        store = (folder / "mlruns").resolve().as_uri()
        defaults |= {"MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": experiment}
        if "MLFLOW_TRACKING_URI" not in os.environ:  # MLflow 3 asks to opt in to its file store
            defaults["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "wandb" in names:
        defaults |= {"WANDB_PROJECT": experiment, "WANDB_DIR": str(run_path)}
    added = {k: v for k, v in defaults.items() if k not in os.environ}  # what the user set stays
    if "MLFLOW_TRACKING_URI" in added:
        import mlflow

        mlflow.set_tracking_uri(added["MLFLOW_TRACKING_URI"])  # not one an earlier experiment of this process set
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _settings_callback(callbacks: list[Any], settings: dict[str, Any], log: Callable[[str], None]) -> Any:
    """A callback that, once the trackers have started (it runs after them), logs the run's settings."""
    from transformers import TrainerCallback
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    writers: list[tuple[type, Callable[[Any, dict[str, Any]], None]]] = [
        (TensorBoardCallback, _tensorboard),
        (MLflowCallback, _mlflow),
        (WandbCallback, _wandb),
    ]

    class SettingsCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            for callback in callbacks:
                for kind, write in writers:
                    if isinstance(callback, kind):
                        try:
                            write(callback, settings)
                        except Exception as exc:  # a tracker's hiccup costs its settings, not the run
                            log(f"{kind.__name__}: could not log the run's settings ({type(exc).__name__}: {exc})")

    return SettingsCallback()


def _tensorboard(callback: Any, settings: dict[str, Any]) -> None:
    """The settings as TensorBoard hyperparameters (HPARAMS tab) and as text, in the run's own writer."""
    from torch.utils.tensorboard.summary import hparams

    writer = callback.tb_writer
    if writer is None:
        return
    for summary in hparams(flatten(settings), {}):
        writer.file_writer.add_summary(summary)
    text = json.dumps(settings, indent=2, default=str, ensure_ascii=False)
    writer.add_text("peftlab/settings", "\n".join("    " + line for line in text.splitlines()))
    writer.flush()


def _mlflow(callback: Any, settings: dict[str, Any]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    limit = int(getattr(callback, "_MAX_PARAM_VAL_LENGTH", 250))
    params = {re.sub(r"[^0-9A-Za-z_\-. /]", "_", PREFIX + k): str(v)[:limit] for k, v in flatten(settings).items()}
    items = list(params.items())
    for at in range(0, len(items), 100):  # MLflow takes at most 100 parameters in one call
        mlflow.log_params(dict(items[at : at + 100]))


def _wandb(callback: Any, settings: dict[str, Any]) -> None:
    import wandb

    if wandb.run is not None:
        wandb.config.update({PREFIX + k: v for k, v in flatten(settings).items()}, allow_val_change=True)
