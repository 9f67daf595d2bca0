"""The experiment schema: defaults, overrides, and errors that name the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.config import apply_overrides, load_experiment
from peftlab.errors import InputError
from tests.conftest import tiny_experiment, write_experiment


def load(tmp_path: Path, exp: dict, **kw) -> object:
    return load_experiment(write_experiment(tmp_path, exp), **kw)


def error_of(tmp_path: Path, exp: dict, **kw) -> str:
    with pytest.raises(InputError) as info:
        load(tmp_path, exp, **kw)
    return str(info.value)


def test_defaults_and_auto_lr_resolve_per_method(tmp_path: Path) -> None:
    exp = load(tmp_path, tiny_experiment(tmp_path))
    lrs = {run.name: run.train.lr for run in exp.runs}
    assert lrs == {"full": 5e-5, "lora": 2e-3, "ia3": 2e-2}
    assert exp.runs[1].settings["r"] == 4 and exp.runs[1].settings["alpha"] == 16
    assert exp.spec.evaluate.splits == ["validation", "test"]


def test_unknown_key_names_file_line_and_suggests(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path)
    exp["train"]["epocs"] = 3
    message = error_of(tmp_path, exp)
    assert "train.epocs: unknown key (did you mean 'epochs'?)" in message
    assert "exp.yaml:" in message
    line = next(i for i, text in enumerate((tmp_path / "exp.yaml").read_text().splitlines(), 1) if "epocs" in text)
    assert f"exp.yaml:{line}: train.epocs" in message


def test_unknown_method_setting_is_caught_with_suggestion(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, methods={"lora": {"rank": 8}})
    message = error_of(tmp_path, exp)
    assert "methods.lora.rank: unknown key" in message and "r, alpha" not in message.split("expected")[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"methods": {"lora": {"r": 0}}}, "methods.lora.r: Input should be greater than 0"),
        ({"methods": {"full": {}, "lora": {"train": {"lr": -1e-4}}}}, "methods.lora.train.lr"),
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"methods": {}}, "methods: "),
        ({"methods": {"loraa": {}}}, "unknown method 'loraa' (did you mean 'lora'?)"),
        ({"methods": {"small": {"method": "nope"}}}, "methods.small.method: unknown method 'nope'"),
        ({"task": "classificaton"}, "unknown task 'classificaton' (did you mean 'classification'?)"),
        ({"task": {"name": "classification", "text_feild": "x"}}, "task.text_feild: unknown key"),
        ({"train": {"epochs": "three"}}, "train.epochs: Input should be a valid integer"),
        ({"data": {"source": "x", "limits": {"train": 0}}}, "data.limits.train"),
        ({"data": {"source": "x", "limits": {"dev": 5}}}, "data.limits.dev"),
    ],
)
def test_bad_values_are_input_errors(tmp_path: Path, change: dict, expected: str) -> None:
    exp = tiny_experiment(tmp_path)
    for key, value in change.items():
        exp[key] = value if key not in ("train",) else {**exp[key], **value}
    assert expected in error_of(tmp_path, exp)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, methods={"lora": {"r": 0}, "ia3": {"bogus": 1}})
    message = error_of(tmp_path, exp)
    assert "2 problems" in message and "methods.lora.r" in message and "methods.ia3.bogus" in message


def test_set_overrides_parse_yaml_values(tmp_path: Path) -> None:
    exp = load(
        tmp_path, tiny_experiment(tmp_path), overrides=["train.lr=1e-4", "methods.lora.r=2", "data.limits.train=10"]
    )
    assert all(run.train.lr == 1e-4 for run in exp.runs)
    assert next(r for r in exp.runs if r.name == "lora").settings["r"] == 2
    assert exp.spec.data.limits == {"train": 10}


def test_set_override_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    assert "train.bogus: unknown key" in error_of(tmp_path, tiny_experiment(tmp_path), overrides=["train.bogus=1"])


def test_only_selects_runs_and_rejects_unknown(tmp_path: Path) -> None:
    exp = load(tmp_path, tiny_experiment(tmp_path), only=["lora"])
    assert [r.name for r in exp.runs] == ["lora"]
    assert "--only lroa: no such run (did you mean 'lora'?)" in error_of(
        tmp_path, tiny_experiment(tmp_path), only=["lroa"]
    )


def test_named_runs_use_method_key_and_per_run_train(tmp_path: Path) -> None:
    methods = {"lora_r2": {"method": "lora", "r": 2, "train": {"lr": 1e-3, "epochs": 1}}}
    exp = load(tmp_path, tiny_experiment(tmp_path, methods=methods))
    run = exp.runs[0]
    assert (run.name, run.method, run.settings["r"], run.train.lr, run.train.epochs) == ("lora_r2", "lora", 2, 1e-3, 1)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: not valid YAML"):
        load_experiment(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="expected a mapping"):
        load_experiment(_write(tmp_path, "- a\n"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    return path


def test_union_errors_are_merged_into_one_message(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, model=123)
    exp["train"]["lr"] = "fast"
    message = error_of(tmp_path, exp)
    assert "train.lr: expected a valid number, unable to parse string as a number, or 'auto' (got 'fast')" in message
    assert message.count("model:") == 1 and "(got 123)" in message
    exp = tiny_experiment(tmp_path, model={"arc": "bert"})
    message = error_of(tmp_path, exp)
    assert "model.arc: unknown key (did you mean 'arch'?)" in message and "valid string" not in message


CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize(
    "path", [p for p in sorted(CONFIGS.rglob("*.yaml")) if "probes" not in p.parts], ids=lambda p: p.name
)
def test_every_shipped_config_validates(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.spec.name == path.stem


def test_squad_offline_study_config_follows_the_protocol() -> None:
    exp = load_experiment(CONFIGS / "papers" / "lora_vs_ia3_squad_offline.yaml")
    sweep = exp.spec.sweep
    assert sweep is not None and sweep.protocol == "sweep-then-train" and sweep.fraction == 0.1 and sweep.epochs == 1
    assert exp.spec.data.source == "asset:squad-v1.1" and exp.spec.data.max_length == 256
    assert exp.task.options["lowercase"] is True and exp.task.options["doc_stride"] == 64


def test_validating_every_config_imports_no_heavy_library() -> None:
    """Config errors come back at once: validation must not load torch, transformers, PEFT or datasets."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from peftlab.config import load_experiment\n"
        f"for path in sorted(Path({str(CONFIGS)!r}).rglob('*.yaml')):\n"
        "    if 'probes' not in path.parts:\n"
        "        load_experiment(path)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'bitsandbytes') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_misspelt_key_is_reported_by_the_cli_without_loading_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write_experiment(tmp_path, {**tiny_experiment(tmp_path), "trian": {"epochs": 1}})
    code = (
        "import sys\n"
        "from peftlab.cli import main\n"
        f"code = main(['run', {str(path)!r}])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "2 False"
    assert "trian: unknown key (did you mean 'train'?)" in result.stderr
