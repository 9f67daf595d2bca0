"""`peftlab export`: a finished run as a folder that plain transformers (and PEFT) load, without peftlab.

A run's adapter/ is PEFT's own format, but using it needs the base model, the label names and the
task's settings, which only the run's config.yaml records. An export puts them where other tools
look: `--merge` folds the adapter into the base weights (PEFT's `merge_and_unload`) and saves a
plain transformers model (safetensors, tokenizer, id2label/label2id in its config) that loads with
the task's AutoModelFor... class; without `--merge` the adapter folder is copied as it is, with a
README.md model card saying what it needs and how it was trained.

Every check runs before anything is written, and the export is written into a temporary sibling
folder that is renamed to its name at the end: a kill leaves either no export or a complete one
(the next export to the same place removes the temporary folder a killed one left).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab import faults
from peftlab.errors import InputError
from peftlab.store import RunDir, follow_umask, read_json, write_atomic

Log = Callable[[str], None]

# The transformers Auto classes peftlab's tasks build their models with (tasks/*.py `build_model`),
# with the table that names each architecture's class for it.
AUTO_TABLES = {
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForMultipleChoice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}
STAGING = re.compile(r"^\.(?P<name>.+)\.(export|replaced)-(?P<pid>\d+)\.tmp$")


@dataclass
class Exported:
    """What `export_run` wrote: the folder, whether it is merged, the class that loads it, and notes."""

    path: Path
    merged: bool
    auto_class: str | None
    notes: list[str] = field(default_factory=list)


def export_run(run_dir: Path, output: Path, *, merge: bool, force: bool = False, log: Log = print) -> Exported:
    """Export the finished run in `run_dir` to `output` (merged model, or adapter + model card).

    InputError (exit 2), before anything is written: not a run folder, a mixture, an unfinished or
    damaged run, an output folder that is not empty (unless `force`) or that overlaps the run.
    """
    folder = finished_run(Path(run_dir))
    target = checked_output(Path(output), folder.path, force)
    config = folder.config()
    if merge:
        model, tokenizer, notes = merged_model(folder, config)  # loading errors come before any write
        auto_class = auto_class_of(model)
    else:
        model = tokenizer = None
        notes = adapter_notes(folder, config)
        auto_class = task_auto_class(folder, config)
    for note in notes:
        log(note)
    with staged(target) as tmp:
        if merge:
            save_model(model, tokenizer, config, tmp)
        else:
            shutil.copytree(folder.adapter_dir, tmp, dirs_exist_ok=True)
        card = model_card(folder, config, merged=merge, auto_class=auto_class, notes=notes, target=target)
        write_atomic(tmp / "README.md", card)  # replaces PEFT's template card in a copied adapter
    loads = f"; load it with {auto_class}" if auto_class else ""
    log(f"exported {folder.path} to {target} ({_kind(folder, merge)}{loads})")
    return Exported(target, merge, auto_class, notes)


# --- checks (nothing written yet) ----------------------------------------------------------------


def finished_run(path: Path) -> RunDir:
    """The run folder, if it is a finished, intact run with a saved model; InputError naming it if not."""
    folder = RunDir(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such run folder; expected a finished run, runs/<experiment>/<run>/")
    if is_mixture(folder):
        raise InputError(
            f"{path}: a mixture of LoRA experts, not a PEFT adapter: it cannot be exported or merged into one "
            "model, because its gate weighs the experts differently for every token of every input (no single "
            "set of weights computes the same); export its expert runs instead (listed in its config.yaml)"
        )
    if problem := folder.unfinished():
        raise InputError(f"{path}: {problem}")
    problem = folder.damage()
    if problem is not None:
        raise InputError(f"{path}: the run's files are damaged ({problem}); retrain it with `peftlab run --fresh`")
    return folder


def is_mixture(folder: RunDir) -> bool:
    """A mixture's folder (runs/<exp>/_mixtures/<name>/): its config names a mixture, its adapter a gate."""
    from peftlab.mixture.settings import FOLDER

    if folder.path.parent.name == FOLDER or (folder.adapter_dir / "mixture.json").exists():
        return True
    return folder.config_file.exists() and "mixture" in folder.config()


def checked_output(output: Path, run: Path, force: bool) -> Path:
    """The output folder, if writing it is allowed: never the run itself (or a folder around or inside
    it, which --force would delete), not a file, and empty unless `force` says it may be replaced."""
    target, run = output.expanduser().resolve(), run.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise InputError(f"{output}: the output folder overlaps the run folder {run}; choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise InputError(f"{output}: exists and is not a folder; choose another --output")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InputError(f"{output}: exists and is not empty; choose another --output, or pass --force to replace it")
    return target


# --- writing: a temporary sibling, renamed at the end ----------------------------------------------


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to write into, renamed to `target` when the block succeeds.

    On an exception the temporary folder is removed; after a kill it stays (hidden, named after this
    process) and the next export to `target` removes it.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        tmp = target.with_name(f".{target.name}.export-{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise InputError(f"{target}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield tmp
        follow_umask(tmp)  # safetensors and copies keep private or old modes
        faults.point("export")  # kill point: everything written, not yet renamed
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing `target` (empty, or replaced with --force) is moved aside
    first and deleted after, so `target` is never a mix of the old and the new export."""
    if not target.exists():
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.replaced-{os.getpid()}.tmp")
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(target: Path) -> None:
    """Delete the temporary folders that killed exports to `target` left (those of live processes stay)."""
    for path in target.parent.glob(f".{target.name}.*.tmp"):
        found = STAGING.match(path.name)
        if found and found["name"] == target.name and not _alive(int(found["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# --- the merged model ------------------------------------------------------------------------------


def merged_model(folder: RunDir, config: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """The run's model with its adapter merged into the base weights, its tokenizer and notes to print.

    Plain runs are rebuilt exactly as `eval` and `predict` rebuild them (trained.load_run), so the
    merged model gives the run's recorded predictions. A run whose base was loaded with from_pretrained
    options (QLoRA's 4-bit weights) is merged into an unquantized copy of the base instead: a model
    others can load and train further, which 4-bit merged weights are not.
    """
    from peft import PeftModel

    from peftlab.methods import method_from_config
    from peftlab.trained import load_run

    method = method_from_config(config)
    quantized = "quantization_config" in method.load_kwargs()
    run = load_run(folder.path, base_kwargs=not quantized)  # QLoRA: onto a full-precision base
    model, tokenizer = run.model, run.tokenizer
    notes: list[str] = []
    if not isinstance(model, PeftModel):  # full fine-tuning: the saved model is the whole model
        notes.append("full fine-tuning trained every weight: there is no adapter to merge; the full model is saved")
        return model, tokenizer, notes
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuses weights that became NaN
    if quantized:
        dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
        notes.append(
            f"QLoRA: the adapter was trained on 4-bit ({(config.get('settings') or {}).get('quantize')}) base "
            f"weights; it is merged into a full-precision ({dtype}) copy of the base, so scores can differ "
            "slightly from the run's recorded ones"
        )
    return merged, tokenizer, notes


def save_model(model: Any, tokenizer: Any, config: dict[str, Any], directory: Path) -> None:
    """A plain transformers folder: safetensors weights, config with the label names, tokenizer."""
    labels = (config.get("task") or {}).get("labels")
    if labels:  # what pipelines and the hub widget show instead of LABEL_0, LABEL_1, ...
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # training turned it off; generation with the export wants it
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def auto_class_of(model: Any) -> str | None:
    """The transformers Auto class that builds this model's class from its config (None: none of the tasks')."""
    from transformers.models.auto import modeling_auto

    name, model_type = type(model).__name__, getattr(model.config, "model_type", None)
    for auto, table in AUTO_TABLES.items():
        if getattr(modeling_auto, table, {}).get(model_type) == name:
            return auto
    return None


# --- the adapter --------------------------------------------------------------------------------------


def task_auto_class(folder: RunDir, config: dict[str, Any]) -> str | None:
    """The Auto class of the run's task model, from its architecture built on the meta device (no
    weights are read); None when the base model's configuration cannot be read here."""
    import torch
    from transformers import AutoTokenizer

    from peftlab.models import ensure_pad_token, resolve_model
    from peftlab.tasks import task_from_config

    try:
        tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(folder.adapter_dir))
        with torch.device("meta"):
            model = task_from_config(config["task"]).build_model(
                resolve_model(config["model"]), tokenizer, weights=False
            )
    except (InputError, OSError, ValueError):  # the card then names no class; the export itself is unaffected
        return None
    return auto_class_of(model)


def adapter_notes(folder: RunDir, config: dict[str, Any]) -> list[str]:
    """What the user must know about an unmerged export: full runs are whole models; a random base
    exists only in peftlab; a QLoRA adapter expects its base loaded in 4-bit."""
    notes = []
    if not (folder.adapter_dir / "adapter_config.json").exists():
        notes.append("full fine-tuning: the run saved the whole model, so the export is the whole model")
    elif isinstance(config.get("model"), dict):
        notes.append(
            "the base model has random weights built by peftlab from a configuration: the adapter cannot be "
            "loaded on it outside peftlab; export with --merge for a model that loads on its own"
        )
    quantize = (config.get("settings") or {}).get("quantize")
    if quantize:
        notes.append(f"QLoRA: the adapter was trained on the base loaded in 4-bit ({quantize}); load it that way")
    return notes


# --- the model card ----------------------------------------------------------------------------------


def model_card(
    folder: RunDir, config: dict[str, Any], *, merged: bool, auto_class: str | None, notes: list[str], target: Path
) -> str:
    """README.md: what the model is, how it was trained and scored, and how to load it."""
    import peftlab

    metrics = folder.metrics()
    model = config.get("model")
    adapter = _is_adapter(folder)
    front: dict[str, Any] = {"library_name": "peft" if adapter and not merged else "transformers", "tags": ["peftlab"]}
    if isinstance(model, str) and not model.startswith("asset:") and not Path(model).exists():
        front["base_model"] = model  # a hub id
    front["tags"].append(str(config.get("method")))
    kind = _kind(folder, merged)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {config.get('experiment', '')}/{config.get('run', folder.name)} ({kind})",
        "",
        f"Exported by peftlab {peftlab.__version__} on {time.strftime('%Y-%m-%d %H:%M')} from `{folder.path}`"
        f" (trained with peftlab {metrics.get('versions', {}).get('peftlab', 'unknown')}).",
        "",
        *[f"> {note}" for note in notes],
        *([""] if notes else []),
        "## Model",
        "",
        f"- base model: {_describe_model(model)}",
        f"- method: {config.get('method')} ({'merged into the base weights' if merged and adapter else 'as trained'})",
        f"- task: {(config.get('task') or {}).get('name')}",
        f"- parameters: {_params(metrics)}",
        "",
        "Settings of the method, and the task's (with the fitted labels):",
        "",
        _yaml_block({"settings": config.get("settings"), "task": config.get("task")}),
        "## Data",
        "",
        _yaml_block(config.get("data")),
        "## Training",
        "",
        _yaml_block({"settings": config.get("train"), "result": _trained(metrics)}),
        "## Scores",
        "",
        *_scores(metrics),
        "## Use",
        "",
        _usage(folder, config, merged, auto_class, target),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _is_adapter(folder: RunDir) -> bool:
    return (folder.adapter_dir / "adapter_config.json").exists()


def _kind(folder: RunDir, merged: bool) -> str:
    if not _is_adapter(folder):
        return "full model"
    return "merged model" if merged else "adapter"


def _describe_model(model: Any) -> str:
    if isinstance(model, dict):
        base = f" ({model['base']})" if model.get("base") else ""
        return f"{model.get('arch')}{base} with random weights, built from a configuration: {model.get('config')}"
    return f"`{model}`"


def _params(metrics: dict[str, Any]) -> str:
    params = metrics.get("params") or {}
    if not params:
        return "not recorded"
    return f"{params['trainable']:,} trained of {params['total']:,} ({params['trainable_pct']:.3f}%)"


def _trained(metrics: dict[str, Any]) -> dict[str, Any]:
    train = metrics.get("train") or {}
    keys = ("steps", "epochs", "train_examples", "train_seconds")
    return {**{k: train[k] for k in keys if k in train}, "precision": metrics.get("precision")}


def _scores(metrics: dict[str, Any]) -> list[str]:
    """A Markdown table: one row per evaluated split, the scalar metrics as columns."""
    evaluated = metrics.get("eval") or {}
    rows = {
        split: {k: v for k, v in scores.items() if isinstance(v, int | float) and k != "eval_seconds"}
        for split, scores in evaluated.items()
    }
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    if not columns:
        return ["No scores recorded.", ""]
    lines = ["| split | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for split, row in rows.items():
        lines.append(f"| {split} | " + " | ".join(_number(row.get(c)) for c in columns) + " |")
    return [*lines, ""]


def _number(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _yaml_block(data: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True).strip() + "\n```\n"


def _usage(folder: RunDir, config: dict[str, Any], merged: bool, auto_class: str | None, target: Path) -> str:
    """A Python snippet that loads the export with transformers (and PEFT for an adapter)."""
    auto = auto_class or "AutoModel"  # a task model peftlab could not name: the bare backbone loads at least
    here = json.dumps(str(target))  # a Python string literal, whatever the path holds
    labels = (config.get("task") or {}).get("labels")
    if merged or not _is_adapter(folder):
        imports, body = f"from transformers import {auto}, AutoTokenizer", f"model = {auto}.from_pretrained({here})"
    else:
        imports, body = _adapter_loading(folder, config, auto, here)
    if labels and auto == "AutoModelForCausalLM":
        label_line = f"\n# a causal LM: it scores the task's prompt + verbalizers (settings above) for labels {labels}"
    else:
        label_line = f"\n# labels, in the order of the model's outputs: {labels}" if labels else ""
    return f"```python\n{imports}\n\ntokenizer = AutoTokenizer.from_pretrained({here})\n{body}{label_line}\n```\n"


def _adapter_loading(folder: RunDir, config: dict[str, Any], auto: str, here: str) -> tuple[str, str]:
    """Imports and code that load the base model as the run did (head size; 4-bit for QLoRA), then the adapter."""
    imports = f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer"
    base = read_json(folder.adapter_dir / "adapter_config.json", {}).get("base_model_name_or_path") or "BASE_MODEL"
    labels = (config.get("task") or {}).get("labels")
    extra = f", num_labels={len(labels)}" if labels and auto != "AutoModelForCausalLM" else ""
    settings = config.get("settings") or {}
    if settings.get("quantize"):
        imports += ", BitsAndBytesConfig"
        double = settings.get("double_quant", True)
        quant = f'load_in_4bit=True, bnb_4bit_quant_type="{settings["quantize"]}", bnb_4bit_use_double_quant={double}'
        extra += f", quantization_config=BitsAndBytesConfig({quant})"
    body = f"base = {auto}.from_pretrained({json.dumps(base)}{extra})\nmodel = PeftModel.from_pretrained(base, {here})"
    return imports, body
