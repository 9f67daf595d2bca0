"""The experiment file: typed schema, defaults, `--set` overrides, and errors that name the line.

Every default lives in the pydantic models below (the README's annotated example mirrors them).
Validation happens in one place, `load_experiment`, before any model or data is touched. Errors are
collected (not just the first) and each names the file, the line, the dotted key and what was
expected; unknown keys get a did-you-mean. Method and task settings are validated by the schema
their own module declares, so adding a method adds its keys without touching this file.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from peftlab.analysis.settings import AnalysisSpec
from peftlab.errors import InputError, did_you_mean
from peftlab.mixture.resolve import check_mixtures
from peftlab.mixture.settings import MixtureSpec
from peftlab.tracking import TRACKERS

SPLITS = ("train", "validation", "test")


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RandomModelSpec(Strict):
    """A model built from a configuration with random weights (tests, `plan`, benchmarks)."""

    arch: str = Field(description="model_type: bert, distilbert, llama, ... (any transformers model type)")
    random_init: Literal[True] = True
    base: str | None = Field(None, description="a known configuration to start from, e.g. distilbert-base-uncased")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the configuration's fields")
    tokenizer: str | None = Field(None, description="tokenizer source; default: peftlab's tiny built-in vocabulary")


class SourceSpec(Strict):
    """One of several datasets merged into one (`data.sources`), with its own fields and labels."""

    source: str = Field(description="asset:NAME, a hub dataset id, a local file or folder")
    name: str | None = Field(None, description="the name its examples are reported under; default from `source`")
    config_name: str | None = Field(None, description="hub dataset configuration")
    files: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=dict, description="local files per split (json, jsonl, csv)"
    )
    splits: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=dict, description="peftlab split -> this source's split name"
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="this source's field -> the field the task reads, e.g. {review: text}"
    )
    label_field: str = Field("label", description="the field (after `fields`) that label_map applies to")
    label_map: dict[str, str | None] | None = Field(
        None, description="this source's label -> the common label (null drops those examples); default: as is"
    )
    limits: dict[Literal["train", "validation", "test"], PositiveInt] = Field(
        default_factory=dict, description="use at most this many of this source's examples per split"
    )

    @field_validator("label_map", mode="before")
    @classmethod
    def _string_keys(cls, value: Any) -> Any:
        """YAML reads `0: negative` with an integer key; labels are compared as text."""
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        ref = self.source.split(":", 1)[1].replace(":", "-") if self.source.startswith("asset:") else self.source
        ref = Path(ref).stem if Path(ref).suffix else ref.rstrip("/").split("/")[-1]
        return ref + (f"-{self.config_name}" if self.config_name else "")


class DataSpec(Strict):
    """Where the examples come from and how much of each split is used."""

    source: str | None = Field(None, description="asset:NAME, a hub dataset id, a local file or folder")
    sources: list[SourceSpec] | None = Field(
        None, min_length=1, description="several datasets merged into one label set (instead of `source`)"
    )
    config_name: str | None = Field(None, description="hub dataset configuration")
    files: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=dict, description="local files per split (json, jsonl, csv)"
    )
    splits: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=dict, description="peftlab split -> the source's split name, e.g. {validation: dev}"
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="carved (seeded) from train when the source has no validation split"
    )
    limits: dict[Literal["train", "validation", "test"], PositiveInt] = Field(
        default_factory=dict, description="use at most this many examples of a split (the first N)"
    )
    max_length: PositiveInt | None = Field(
        None, description="tokens per sequence (longer inputs are truncated or windowed); default: the task's"
    )
    seed: int = Field(0, description="seed for derived splits")

    @model_validator(mode="after")
    def _one_origin(self) -> DataSpec:
        if self.sources is not None:
            if self.source or self.files or self.config_name:
                raise ValueError("give either `sources` or `source` (with `files`/`config_name`), not both")
            names = [s.display_name for s in self.sources]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"sources named alike: {', '.join(repeated)}; give each a distinct `name`")
        elif not self.source and not self.files:
            raise ValueError("no data: set `source` (or `files`, or `sources`)")
        return self


class EarlyStoppingSpec(Strict):
    """Patience on a validation metric, checked after each epoch (the Trainer's EarlyStoppingCallback)."""

    patience: PositiveInt = Field(3, description="stop after this many epochs without improvement")
    metric: str = Field("auto", description="auto = the task's primary metric; loss; or any metric the task reports")
    min_delta: float = Field(0.0, ge=0, description="an improvement smaller than this does not count")


class TrainSpec(Strict):
    """Training settings shared by every run (a method entry may override any of them)."""

    # How a run is watched, not what it computes: left out of the run's fingerprint (experiment.run_config).
    UNFINGERPRINTED: ClassVar[tuple[str, ...]] = ("log_every", "report_to")

    epochs: PositiveInt = 3
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps")
    batch_size: PositiveInt = 16
    eval_batch_size: PositiveInt | None = Field(None, description="default: 2 x batch_size")
    grad_accum: PositiveInt = 1
    lr: float | Literal["auto"] = Field("auto", description="a number, or auto = the method's default")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        exclude=True,  # expanded into one run per seed (sweep.py); each run records its own `seed`
        description="repeat every run (and sweep point) once per seed; tables show mean ± std",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast where the hardware supports it, else fp32"
    )
    checkpoint_every: Literal["epoch"] | PositiveInt = Field(
        "epoch", description="'epoch' or a number of optimizer steps"
    )
    gradient_checkpointing: bool = False
    group_by_length: bool = Field(
        True,
        description="training batches of examples of similar length (seeded, as transformers' group_by_length): "
        "less padding, the same examples per epoch",
    )
    fast_dropout: bool = Field(
        True,
        description="on the CPU, dropout masks from four 16-bit numbers per 64-bit draw (dropout.py): the same "
        "operation, about 4x cheaper than torch's; false: torch's own (CUDA always uses torch's own)",
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="stop when a validation metric stops improving; the best epoch's weights are kept"
    )
    log_every: Literal["auto"] | PositiveInt = Field(
        "auto",
        description="log the training loss every N optimizer steps (history.jsonl step rows, trackers); "
        "auto = about 20 points an epoch",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="experiment trackers the run logs to: tensorboard, mlflow, wandb (pip install 'peftlab[NAME]')",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return value  # pydantic says what is expected
        for name in names:
            if name not in TRACKERS:
                raise ValueError(
                    f"unknown tracker '{name}'{did_you_mean(name, list(TRACKERS))}; known: {', '.join(TRACKERS)} "
                    "(each installs with pip install 'peftlab[NAME]')"
                )
        return list(dict.fromkeys(names))

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value: float | str) -> float | str:
        if isinstance(value, float) and value <= 0:
            raise ValueError("the learning rate must be > 0 (or 'auto')")
        return value

    @model_validator(mode="after")
    def _early_stopping_per_epoch(self) -> TrainSpec:
        if self.early_stopping is not None and self.checkpoint_every != "epoch":
            raise ValueError(
                "early_stopping evaluates and keeps the best weights once per epoch: set checkpoint_every: epoch"
            )
        return self


class ExtraEvalSpec(Strict):
    """More data every trained run is scored on (e.g. out of domain), under its own name."""

    source: str = Field(description="asset:NAME, a local file or folder, or a hub dataset id")
    config_name: str | None = Field(None, description="hub dataset configuration")
    split: str | None = Field(None, description="which split of the source (default: test, or the only one)")
    limit: PositiveInt | None = Field(None, description="use at most this many examples (a seeded sample)")


class ForgettingSpec(ExtraEvalSpec):
    """General-knowledge data the runs never train on, scored for the base model once and for every
    run, with a task of its own (e.g. MMLU general subjects by lm_multiple_choice, Wikipedia
    paragraphs by lm_text's per-token cross-entropy): forgetting is the change, run minus base."""

    task: str | dict[str, Any] | None = Field(
        None, description="the task that scores it (a name or {name, options}); default: the experiment's task"
    )
    max_length: PositiveInt | None = Field(None, description="tokens per sequence; default: data.max_length")


def _check_names(value: dict[str, Any], what: str) -> None:
    for name in value:
        if name in SPLITS or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            raise ValueError(
                f"{what} name '{name}' must differ from train/validation/test and use only "
                "letters, digits, '_', '.', '-'"
            )


class EvaluateSpec(Strict):
    """Which splits every trained run is scored on, and whether baselines are computed."""

    splits: list[Literal["validation", "test"]] = Field(default_factory=lambda: ["validation", "test"])
    baselines: bool = Field(True, description="majority class (or the task's own) and the untrained model")
    extra: dict[str, ExtraEvalSpec] = Field(
        default_factory=dict, description="name -> more evaluation data (a source, or {source, split, limit})"
    )

    forgetting: dict[str, ForgettingSpec] = Field(
        default_factory=dict,
        description="name -> general data the runs never train on ({source, task, split, limit}): scored for the "
        "base model and every run; the report shows base, run and the change",
    )

    @field_validator("extra", "forgetting", mode="before")
    @classmethod
    def _source_shorthand(cls, value: Any) -> Any:
        """`ood: asset:drug-reviews-3way` is short for `ood: {source: asset:drug-reviews-3way}`."""
        if isinstance(value, dict):
            return {k: ({"source": v} if isinstance(v, str) else v) for k, v in value.items()}
        return value

    @field_validator("extra")
    @classmethod
    def _extra_names(cls, value: dict[str, ExtraEvalSpec]) -> dict[str, ExtraEvalSpec]:
        _check_names(value, "evaluation data")
        return value

    @field_validator("forgetting")
    @classmethod
    def _forgetting_names(cls, value: dict[str, ForgettingSpec]) -> dict[str, ForgettingSpec]:
        _check_names(value, "forgetting set")
        return value

    def all_splits(self) -> list[str]:
        """The experiment's own evaluated splits, then the extra evaluation data by name."""
        return [*self.splits, *self.extra]


class SweepSpec(Strict):
    """A grid over dotted settings; each point is a run (see sweep.py and the README's "Sweeps")."""

    grid: dict[str, Any] = Field(
        description="dotted key -> list of values: train.KEY (every run), METHOD.KEY or RUN.KEY (that "
        "method's or run's setting), RUN.train.KEY; train.lr: auto = a grid around each method's default"
    )
    protocol: Literal["grid", "sweep-then-train"] = Field(
        "grid",
        description="grid: every point is a full run; sweep-then-train: sweep short on a fraction of the "
        "training data, select per run by a validation metric, then train the selected point in full",
    )
    fraction: float | None = Field(
        None, gt=0, le=1, description="sweep-then-train: fraction of the training examples (default 0.1)"
    )
    epochs: PositiveInt | None = Field(None, description="sweep-then-train: epochs of each sweep point (default 1)")
    metric: str = Field("loss", description="validation metric that selects (loss, or one the task reports)")
    direction: Literal["min", "max"] | None = Field(None, description="default: min for loss, else the task's")


class ExecutorSpec(Strict):
    """Where runs execute. Ray does the scheduling on a cluster; peftlab only declares resources."""

    name: Literal["process", "inline", "ray"] = Field(
        "process", description="process: a worker process per run (default); inline; ray: Ray tasks"
    )
    address: str | None = Field(
        None, description="ray: the cluster to join (ray.init(address=...), e.g. auto); default: RAY_ADDRESS or local"
    )
    num_cpus: float = Field(1, gt=0, description="ray: CPUs each run declares (also its torch threads)")
    num_gpus: float = Field(0, ge=0, description="ray: GPUs each run declares")
    memory_gb: float | None = Field(None, gt=0, description="ray: memory each run declares")
    nproc_per_run: PositiveInt = Field(
        1,
        description="process and ray: train each run data-parallel in N processes under torchrun "
        "(DDP; gloo on the CPU, NCCL on GPUs); the global batch is N x batch_size",
    )


KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # model and task keys: no dots, they join run names


class TaskEntry(Strict):
    """One task of a multi-task experiment: the task, its data, and training settings for it."""

    key: str | None = Field(None, pattern=KEY_PATTERN, description="its name in run names and the report")
    task: str | dict[str, Any]
    data: DataSpec
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of `train` for this task")
    evaluate: dict[str, Any] = Field(
        default_factory=dict, description="overrides of `evaluate` for this task (e.g. its own extra data)"
    )


class Experiment(Strict):
    """One experiment file: one model, task and data, or several (`models:`, `tasks:`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: str | RandomModelSpec | None = None
    models: dict[str, str | RandomModelSpec] | None = Field(
        None, min_length=1, description="several models: key -> model; each (model, task, method) is a run"
    )
    task: str | dict[str, Any] | None = None
    data: DataSpec | None = None
    tasks: list[TaskEntry] | None = Field(None, min_length=1, description="several tasks, each with its data")
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    sweep: SweepSpec | None = Field(None, description="a grid of runs; see the README's Sweeps")
    analysis: AnalysisSpec | None = Field(
        None, description="what training changed inside the model, measured after each run (`true`: all parts)"
    )
    mixtures: dict[str, MixtureSpec] | None = Field(
        None, description="mixtures of LoRA experts (method xlora), trained after the runs; see the README"
    )
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    output_dir: str = Field("runs", description="runs are written to OUTPUT_DIR/NAME/")

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """`train:` with nothing under it means the defaults, as it reads; `executor: ray` names one."""
        if isinstance(data, dict):
            data = {k: ({} if v is None and k in ("train", "evaluate", "methods") else v) for k, v in data.items()}
            if isinstance(data.get("executor"), str):
                data["executor"] = {"name": data["executor"]}
        return data

    @field_validator("methods")
    @classmethod
    def _run_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for run in value:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", run):
                raise ValueError(f"run name '{run}' may use only letters, digits, '_', '.', '-'")
        return {run: settings or {} for run, settings in value.items()}

    @field_validator("models")
    @classmethod
    def _model_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in value or {}:
            if not re.match(KEY_PATTERN, key):
                raise ValueError(f"model key '{key}' may use only letters, digits, '_', '-'")
        return value

    @property
    def is_multi(self) -> bool:
        """True for the multi-model / multi-task form (`models:` or `tasks:`)."""
        return self.models is not None or self.tasks is not None


@dataclass(frozen=True)
class TaskSpec:
    """The task's registered name and its validated options (plain values for the builder)."""

    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class RunSpec:
    """One run: a method with resolved settings and resolved training settings.

    In a multi-model / multi-task experiment `group` names the run's model key, task key and method
    entry (the run's name joins them with dots); it is empty in the single-task form.

    Runs expanded from a sweep (sweep.py) also carry where they came from: `base` (the method
    entry's run name), `point` (dotted key -> value), `stage` (run | sweep | final); sweep points of
    the sweep-then-train protocol train on `data_fraction` of the training data, are scored on
    `eval_splits` only and keep no model. A name may contain '/' (sweep points live in sweep/).
    """

    name: str
    method: str
    settings: dict[str, Any]
    train: TrainSpec
    group: dict[str, str] = field(default_factory=dict)
    base: str = ""
    point: dict[str, Any] = field(default_factory=dict)
    stage: Literal["run", "sweep", "final"] = "run"
    data_fraction: float = 1.0
    eval_splits: tuple[str, ...] | None = None
    save_model: bool = True
    index: int = 0

    @property
    def base_name(self) -> str:
        return self.base or self.name

    @property
    def entry(self) -> str:
        """The method entry the run comes from (its name in `methods:`)."""
        return self.group.get("method") or self.base_name

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON) for a worker process or a Ray task."""
        return {**dataclasses.asdict(self), "train": self.train.model_dump(), "eval_splits": self.eval_splits}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        splits = data.get("eval_splits")
        return cls(
            **{**data, "train": TrainSpec.model_validate(data["train"]), "eval_splits": splits and tuple(splits)}
        )


@dataclass(frozen=True)
class LoadedExperiment:
    """A validated experiment: the schema object plus what was resolved from it.

    A multi-model / multi-task experiment is a list of `parts`, one per (model, task) group, each
    a single-task experiment of its own (spec with one model, task and data; its runs; `group`
    naming its keys). Its own `task` is None and its `runs` are all the parts' runs. Code that
    prepares data or builds models works on `groups()`, which is [self] for the single-task form.
    """

    path: Path
    spec: Experiment
    task: TaskSpec | None
    runs: list[RunSpec]
    raw: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    group: dict[str, str] = field(default_factory=dict)
    parts: tuple[LoadedExperiment, ...] = ()
    sweep: Any = None  # sweep.SweepPlan when the experiment has a sweep (or seeds); a part has its own

    def groups(self) -> list[LoadedExperiment]:
        """The single-task experiments to prepare: the parts (those with runs), or the experiment itself."""
        return [part for part in self.parts if part.runs] if self.parts else [self]

    def group_of(self, run: RunSpec) -> LoadedExperiment:
        """The (model, task) group a run belongs to (from its `group`; the experiment itself if single-task)."""
        key = (run.group.get("model", ""), run.group.get("task", ""))
        for part in self.groups():
            if (part.group.get("model", ""), part.group.get("task", "")) == key:
                return part
        raise InputError(f"{self.path}: run '{run.name}': no model/task group {'.'.join(key)} in the experiment")

    @property
    def group_name(self) -> str:
        """'model.task' of a part (what it shares in run names); '' for the single-task form."""
        return ".".join(v for v in (self.group.get("model"), self.group.get("task")) if v)

    @property
    def base_dir(self) -> Path:
        """Relative data paths in the file are relative to the file's own folder."""
        return self.path.parent

    @property
    def runs_dir(self) -> Path:
        return Path(self.spec.output_dir) / self.spec.name


# ---------------------------------------------------------------------------------------------
# YAML with line numbers, and YAML 1.2 floats ("1e-4" is a float, not a string)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float, as YAML 1.2 and every user expects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


MAX_CONFIG_BYTES = 1 << 20  # an experiment or examples file; anything larger is not one
MAX_YAML_NODES = 100_000  # after alias expansion: a few hundred bytes of nested aliases can mean billions


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes an InputError naming the file and line.

    Aliases are expanded only after counting what they expand to, so a "billion laughs" document
    is rejected at once instead of consuming minutes and memory in the code that walks it.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise InputError(
                f"{source}: its aliases expand to {size:,} values (at most {MAX_YAML_NODES:,}); "
                "an experiment file needs far fewer"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise InputError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise InputError(f"{source}: nested too deep to be a peftlab file") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in the document once every alias is expanded (shared nodes counted once per use)."""
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML mapping document to its 1-based line number."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                index[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, ())
    return index


# ---------------------------------------------------------------------------------------------
# --set overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a copy of the raw config."""
    data = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):  # a list item by its index: data.sources.0.limits.train=100
                node = _list_item(node, part, item)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict | list):
                raise InputError(f"--set {item!r}: '{part}' is not a section")
            node = child
        parsed = parse_yaml(value, f"--set {key}") if value.strip() else None
        if isinstance(node, list):
            _list_item(node, parts[-1], item)  # checks the index
            node[int(parts[-1])] = parsed
        else:
            node[parts[-1]] = parsed
    return data


def _list_item(items: list[Any], part: str, item: str) -> Any:
    if not part.isdigit() or int(part) >= len(items):
        raise InputError(f"--set {item!r}: '{part}' is not an index of a list of {len(items)} items")
    return items[int(part)]


# ---------------------------------------------------------------------------------------------
# Validation


def _format_pydantic(exc: ValidationError, model: type[BaseModel], prefix: tuple[str, ...]) -> list[tuple]:
    """Turn pydantic errors into (key path, message) pairs with did-you-mean for unknown keys.

    A value that fails every member of a union (e.g. `lr: float | 'auto'`) gives one error per
    member; they are merged into one "expected A or B" message. When a mapping was given for a
    `str | Spec` union, only the Spec's own errors are kept: the user clearly meant the mapping form.
    """
    found: dict[tuple[str, ...], list[str]] = {}
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if not _is_union_tag(p))
        found.setdefault(prefix + loc, []).append(_message(err, model, loc))
    deeper = {path[:n] for path in found for n in range(len(path))}
    out = []
    for path, messages in found.items():
        if path in deeper and all(m.startswith("Input should be a valid") for m in messages):
            continue
        out.append((path, messages[0] if len(messages) == 1 else _merge(messages)))
    return out


def _message(err: dict[str, Any], model: type[BaseModel], loc: tuple[str, ...]) -> str:
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        msg = f"unknown key{did_you_mean(loc[-1], known)}"
        return msg + (f"; expected one of: {', '.join(sorted(known))}" if known else "")
    if err["type"] == "missing":
        return "required key is missing"
    got = err.get("input")
    return err["msg"] + ("" if isinstance(got, dict | list) else f" (got {got!r})")


def _merge(messages: list[str]) -> str:
    """'Input should be X (got v)' + 'Input should be Y (got v)' -> 'expected X, or Y (got v)'."""
    got = ""
    parts = []
    for message in messages:
        if " (got " in message:
            message, got = message.rsplit(" (got ", 1)
            got = f" (got {got}"
        parts.append(message.removeprefix("Input should be ").removeprefix("Value error, "))
    return "expected " + ", or ".join(dict.fromkeys(parts)) + got


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the tried union member (e.g. 'str', 'RandomModelSpec') into error locations."""
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool", "dict[str,any]", "function-after[_positive_lr(), float]"}
        or part.startswith(("literal[", "function-", "constrained-"))
        or part.endswith("Spec")
    )


def _fields_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The field names of the (nested) model at `loc`, for did-you-mean suggestions."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation like `X | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


class _Problems:
    """Collects (key path, message) pairs and renders them with file and line."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int]) -> None:
        self.source = source
        self.lines = lines
        self.items: list[str] = []

    def add(self, path: tuple[str, ...], message: str) -> None:
        line = None
        for n in range(len(path), 0, -1):
            line = self.lines.get(path[:n])
            if line:
                break
        where = f"{self.source}:{line}" if line else self.source
        key = ".".join(path) if path else "(top level)"
        text = f"{where}: {key}: {message}"
        if text not in self.items:  # the groups of a multi-task experiment share their method entries
            self.items.append(text)

    def raise_if_any(self) -> None:
        if self.items:
            count = len(self.items)
            raise InputError(
                f"{self.source}: {count} problem{'s' * (count > 1)} in the experiment file:", problems=self.items
            )


def load_experiment(
    path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None
) -> LoadedExperiment:
    """Read, override, validate and resolve an experiment file. Raises InputError on any problem."""
    from peftlab.store import read_text

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such experiment file")
    text = read_text(path, max_bytes=MAX_CONFIG_BYTES)
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of keys (name, model, task, data, methods, ...)")
    raw = apply_overrides(raw, overrides or [])
    loaded = validate_experiment(raw, path, line_index(text), only)
    parts = tuple(dataclasses.replace(part, overrides=list(overrides or [])) for part in loaded.parts)
    return dataclasses.replace(loaded, overrides=list(overrides or []), parts=parts)


def validate_experiment(
    raw: dict[str, Any], path: Path, lines: dict[tuple[str, ...], int] | None = None, only: list[str] | None = None
) -> LoadedExperiment:
    """Validate a raw experiment mapping (see load_experiment)."""
    problems = _Problems(str(path), lines or {})
    try:
        spec = Experiment.model_validate(raw)
    except ValidationError as exc:
        for key_path, msg in _format_pydantic(exc, Experiment, ()):
            problems.add(key_path, msg)
        problems.raise_if_any()
        raise  # unreachable: pydantic always reports at least one error
    _check_form(spec, problems)
    check_mixtures(spec, problems)
    problems.raise_if_any()
    from peftlab.sweep import combine, expand

    if spec.is_multi:
        parts = _resolve_parts(spec, raw, path, problems, only)
        problems.raise_if_any()
        plans = [expand(part.spec, part.task, part.runs, problems) for part in parts]  # type: ignore[arg-type]
        problems.raise_if_any()
        parts = [
            dataclasses.replace(part, runs=plan.first_runs(), sweep=plan)
            for part, plan in zip(parts, plans, strict=True)
        ]
        runs = [run for part in parts for run in part.runs]
        return LoadedExperiment(
            path=path, spec=spec, task=None, runs=runs, raw=raw, parts=tuple(parts), sweep=combine(plans)
        )
    assert spec.task is not None
    task = _validate_task(spec.task, ("task",), problems)
    if task is not None:
        _check_forgetting(task, spec.evaluate, ("evaluate",), problems)
    runs = _resolve_runs(spec, problems, only)
    problems.raise_if_any()
    assert task is not None and spec.data is not None
    _default_max_length(spec.data, task.name)
    plan = expand(spec, task, runs, problems)
    problems.raise_if_any()
    return LoadedExperiment(path=path, spec=spec, task=task, runs=plan.first_runs(), raw=raw, sweep=plan)


def _default_max_length(data: DataSpec, task_name: str) -> None:
    """`data.max_length` left out: the task's own default (classification 128, qa 256)."""
    if data.max_length is None:
        from peftlab.tasks import TASKS

        data.max_length = TASKS.get(task_name).default_max_length


def _check_form(spec: Experiment, problems: _Problems) -> None:
    """One model (`model`) or several (`models`); one task with its data (`task`, `data`) or several (`tasks`)."""
    if spec.model is not None and spec.models is not None:
        problems.add(("models",), "give either `model:` (one model) or `models:` (key -> model), not both")
    elif spec.model is None and spec.models is None:
        problems.add(("model",), "required key is missing (or `models:` for several models)")
    for key in ("task", "data"):
        if spec.tasks is not None and getattr(spec, key) is not None:
            problems.add((key,), f"with `tasks:` each task entry has its own {key}; remove the top-level `{key}:`")
        elif spec.tasks is None and getattr(spec, key) is None:
            problems.add((key,), "required key is missing (or `tasks:` for several tasks, each with its data)")


def _validate_task(value: str | dict[str, Any], where: tuple[str, ...], problems: _Problems) -> TaskSpec | None:
    """Look the task up in the registry and validate its options with the task's own schema."""
    from peftlab.tasks import TASKS

    options = {"name": value} if isinstance(value, str) else dict(value)
    name = options.pop("name", None)
    if not name:
        problems.add((*where, "name"), "required key is missing (the task's name, e.g. classification)")
        return None
    try:
        task_cls = TASKS.get(name)
    except InputError as exc:
        problems.add(where if isinstance(value, str) else (*where, "name"), str(exc))
        return None
    try:
        validated = task_cls.Options.model_validate(options).model_dump()
    except ValidationError as exc:
        for key_path, msg in _format_pydantic(exc, task_cls.Options, where):
            problems.add(key_path, msg)
        return None
    return TaskSpec(name=name, options=validated)


def _check_only(only: list[str] | None, names: list[str], problems: _Problems) -> None:
    """Every --only name must select at least one run."""
    for name in only or []:
        if name not in names:
            problems.add(
                ("methods",),
                f"--only {name}: no such run{did_you_mean(name, names)}; the runs are: {', '.join(names)}",
            )


def _resolve_runs(
    spec: Experiment, problems: _Problems, only: list[str] | None, group: dict[str, str] | None = None
) -> list[RunSpec]:
    """Validate each method entry with its method's schema and resolve its training settings.

    In a group of a multi-task experiment the run is named 'model.task.entry' and `only` may name
    the full run name, a model key, a task key or a method entry.
    """
    from peftlab.methods import METHODS

    if group is None:
        _check_only(only, list(spec.methods), problems)
    runs = []
    for run_name, entry in spec.methods.items():
        selectors = {run_name, *(group or {}).values()}
        full = ".".join(v for v in (*(group or {}).values(), run_name) if v)
        if only and not (selectors | {full}) & set(only):
            continue
        run = _resolve_run(spec, run_name, dict(entry), problems, METHODS)
        if run is not None:
            runs.append(dataclasses.replace(run, name=full, group={**group, "method": run_name}) if group else run)
    return runs


def _resolve_parts(
    spec: Experiment, raw: dict[str, Any], path: Path, problems: _Problems, only: list[str] | None
) -> list[LoadedExperiment]:
    """One single-task experiment per (model, task): its spec, task options, runs and group keys."""
    models = spec.models if spec.models is not None else {"": spec.model}
    entries = spec.tasks if spec.tasks is not None else [TaskEntry(task=spec.task, data=spec.data)]  # type: ignore[arg-type]
    named: list[tuple[str, TaskSpec, TaskEntry, TrainSpec, EvaluateSpec]] = []
    for i, entry in enumerate(entries):
        where = ("tasks", str(i)) if spec.tasks is not None else ()
        task = _validate_task(entry.task, (*where, "task"), problems)
        train = _task_train(spec, entry, (*where, "train"), problems)
        evaluate = _task_evaluate(spec, entry, (*where, "evaluate"), problems)
        if task is None or train is None or evaluate is None:
            continue
        _default_max_length(entry.data, task.name)
        key = "" if spec.tasks is None else (entry.key or task.name)
        if any(key == other for other, *_ in named):
            problems.add((*where, "key"), f"task key '{key}' is used twice; give each task entry its own `key:`")
        _check_forgetting(task, evaluate, (*where, "evaluate") if entry.evaluate else ("evaluate",), problems)
        named.append((key, task, entry, train, evaluate))
    parts, names = [], []
    for model_key, model in models.items():
        for task_key, task, entry, train, evaluate in named:
            group = {"model": model_key, "task": task_key}
            view = spec.model_copy(
                update={
                    "model": model,
                    "models": None,
                    "task": entry.task,
                    "data": entry.data,
                    "tasks": None,
                    "train": train,
                    "evaluate": evaluate,
                }
            )
            runs = _resolve_runs(view, problems, only, group)
            names += [".".join(v for v in (model_key, task_key, m) if v) for m in spec.methods]
            parts.append(LoadedExperiment(path=path, spec=view, task=task, runs=runs, raw=raw, group=group))
    selectors = [*names, *models, *(key for key, *_ in named), *spec.methods]
    _check_only(only, [name for name in dict.fromkeys(selectors) if name], problems)
    return parts


def _task_train(spec: Experiment, entry: TaskEntry, where: tuple[str, ...], problems: _Problems) -> TrainSpec | None:
    """The experiment's training settings with the task entry's overrides."""
    if not entry.train:
        return spec.train
    try:
        # `seeds` is excluded from dumps (it expands into runs): carried over by hand
        return TrainSpec.model_validate({**spec.train.model_dump(), "seeds": spec.train.seeds, **entry.train})
    except ValidationError as exc:
        for key_path, msg in _format_pydantic(exc, TrainSpec, where):
            problems.add(key_path, msg)
        return None


def _task_evaluate(
    spec: Experiment, entry: TaskEntry, where: tuple[str, ...], problems: _Problems
) -> EvaluateSpec | None:
    """The experiment's evaluation settings with the task entry's overrides (each key replaced whole)."""
    if not entry.evaluate:
        return spec.evaluate
    try:
        return EvaluateSpec.model_validate({**spec.evaluate.model_dump(), **entry.evaluate})
    except ValidationError as exc:
        for key_path, msg in _format_pydantic(exc, EvaluateSpec, where):
            problems.add(key_path, msg)
        return None


def _check_forgetting(task: TaskSpec, evaluate: EvaluateSpec, where: tuple[str, ...], problems: _Problems) -> None:
    """Each forgetting set's task is known, its options valid, and it scores the same kind of model
    (a causal LM with its LM head): the trained model is scored as it is, with another task."""
    from peftlab.tasks import TASKS

    if not evaluate.forgetting:
        return
    main = TASKS.get(task.name)(**task.options)
    if main.peft_task_type != "CAUSAL_LM":
        problems.add(
            (*where, "forgetting"),
            f"forgetting sets need a causal LM scored by its LM head; task '{task.name}' builds another model "
            "(use lm_multiple_choice, lm_generation, lm_text or causal_classification with head: lm)",
        )
        return
    for name, item in evaluate.forgetting.items():
        given = item.task if item.task is not None else {"name": task.name, **task.options}
        checked = _validate_task(given, (*where, "forgetting", name, "task"), problems)
        if checked is not None and TASKS.get(checked.name)(**checked.options).peft_task_type != "CAUSAL_LM":
            problems.add(
                (*where, "forgetting", name, "task"),
                f"task '{checked.name}' does not score a causal LM by its LM head; use lm_multiple_choice, "
                "lm_generation or lm_text",
            )


def _resolve_run(
    spec: Experiment, run_name: str, entry: dict[str, Any], problems: _Problems, methods: Any
) -> RunSpec | None:
    """One method entry -> RunSpec; problems are recorded under methods.<run>.<key>."""
    method_name = entry.pop("method", run_name)
    try:
        method_cls = methods.get(method_name)
    except InputError as exc:
        where = ("methods", run_name, "method") if "method" in spec.methods[run_name] else ("methods", run_name)
        problems.add(where, str(exc) + " (name the method with `method:` when the run has another name)")
        return None
    train_override = entry.pop("train", None) or {}
    try:
        settings = method_cls.Settings.model_validate(entry).model_dump()
    except ValidationError as exc:
        for key_path, msg in _format_pydantic(exc, method_cls.Settings, ("methods", run_name)):
            problems.add(key_path, msg)
        return None
    try:
        train = TrainSpec.model_validate({**spec.train.model_dump(), **train_override})
    except ValidationError as exc:
        for key_path, msg in _format_pydantic(exc, TrainSpec, ("methods", run_name, "train")):
            problems.add(key_path, msg)
        return None
    if train.lr == "auto":
        train = train.model_copy(update={"lr": method_cls.default_lr})
    return RunSpec(name=run_name, method=method_name, settings=settings, train=train)


def check_limits(spec: DataSpec, sizes: dict[str, int], source: str) -> None:
    """A data limit larger than the split is an input error (checked before any model is loaded)."""
    problems = [
        f"data.limits.{split}: {limit} is larger than the {sizes[split]} examples of the {split} split"
        for split, limit in spec.limits.items()
        if split in sizes and limit > sizes[split]
    ]
    if problems:
        raise InputError(f"{source}: data limits exceed the data:", problems=problems)
