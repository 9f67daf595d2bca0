"""Bad mixtures are refused before anything trains: `peftlab run` exits 2 with a message that names the
mixture's key or the expert, and leaves no run folder behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file, save_file

from peftlab.cli import main
from peftlab.errors import EXIT_BAD_INPUT, InputError
from peftlab.mixture.experts import Expert, check_experts, read_expert
from peftlab.mixture.model import build_mixture
from peftlab.mixture.settings import MixtureSpec
from peftlab.models import resolve_model
from tests.conftest import tiny_experiment, write_experiment
from tests.mixture.conftest import Finished, tokenizer_of
from tests.test_multitask import multitask


def refused(tmp_path: Path, exp: dict[str, Any], capsys: pytest.CaptureFixture) -> str:
    """Run the experiment through the CLI: it must exit 2 before training; its stderr."""
    assert main(["run", str(write_experiment(tmp_path, exp))]) == EXIT_BAD_INPUT
    runs = tmp_path / "runs" / exp["name"]
    assert not runs.exists() or not [p for p in runs.iterdir() if (p / "config.yaml").exists()], "a run trained"
    return capsys.readouterr().err


def test_experts_of_a_full_fine_tuning_entry_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = refused(tmp_path, multitask(tmp_path, mixtures={"mix": {"experts": "full"}}), capsys)
    assert "mixtures.mix.experts" in err and "'full' is not a LoRA method entry" in err and "LoRA entries: lora" in err


def test_a_single_task_experiment_cannot_mix_its_entry(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = refused(tmp_path, tiny_experiment(tmp_path, mixtures={"mix": {"experts": "lora"}}), capsys)
    assert "mixtures.mix.experts" in err and "at least two tasks" in err


@pytest.mark.parametrize(
    ("mixture", "expected"),
    [
        ({"experts": "lora", "top_k": 0}, "mixtures.mix.top_k"),
        ({"experts": "lora", "gate": "tokenwise"}, "mixtures.mix.gate"),
        ({"experts": "lora", "softmax_temperature": 0}, "mixtures.mix.softmax_temperature"),
        ({"experts": "lora", "model": "huge"}, "'huge' is not a key of `models:`"),
        ({"experts": "lora", "gatesize": 8}, "gatesize: unknown key"),
    ],
)
def test_bad_settings_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, mixture: dict[str, Any], expected: str
) -> None:
    assert expected in refused(tmp_path, multitask(tmp_path, mixtures={"mix": mixture}), capsys)


# --- experts from another experiment, checked before anything trains ------------------------------------


def copy_expert(
    finished: Finished, task: str, to: Path, *, config: dict | None = None, state: str | None = None
) -> Path:
    """A copy of a finished expert run, its config.yaml or status changed."""
    folder = to / f"{task}-copy"
    shutil.copytree(finished.experts[task], folder)
    if config:
        data = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**data, **config}, sort_keys=False))
    if state:
        status = json.loads((folder / "status.json").read_text())
        (folder / "status.json").write_text(json.dumps({**status, "state": state}))
    return folder


def with_outside_experts(tmp_path: Path, folders: list[Path]) -> dict[str, Any]:
    return multitask(tmp_path, mixtures={"mix": {"experts": [str(p) for p in folders]}})


def test_one_expert_is_not_a_mixture(tmp_path: Path, finished: Finished, capsys: pytest.CaptureFixture) -> None:
    err = refused(tmp_path, with_outside_experts(tmp_path, [finished.experts["wnut"]]), capsys)
    assert "mixtures.mix.experts" in err and "at least two experts; got 1" in err


def test_a_full_fine_tuning_run_is_not_an_expert(
    tmp_path: Path, finished: Finished, capsys: pytest.CaptureFixture
) -> None:
    full = copy_expert(finished, "sentiment", tmp_path, config={"method": "full"})
    err = refused(tmp_path, with_outside_experts(tmp_path, [finished.experts["wnut"], full]), capsys)
    assert f"expert {full}: a full run, not a LoRA run" in err


def test_an_unfinished_run_is_not_an_expert(tmp_path: Path, finished: Finished, capsys: pytest.CaptureFixture) -> None:
    running = copy_expert(finished, "wnut", tmp_path, state="running")
    err = refused(tmp_path, with_outside_experts(tmp_path, [running, finished.experts["sentiment"]]), capsys)
    assert f"expert {running}: the run is not finished (status: running)" in err


def test_experts_on_different_base_models_exit_2(
    tmp_path: Path, finished: Finished, capsys: pytest.CaptureFixture
) -> None:
    model = yaml.safe_load((finished.experts["sentiment"] / "config.yaml").read_text())["model"]
    other = {**model, "config": {**model["config"], "num_hidden_layers": 3}}
    moved = copy_expert(finished, "sentiment", tmp_path, config={"model": other})
    err = refused(tmp_path, with_outside_experts(tmp_path, [finished.experts["wnut"], moved]), capsys)
    assert f"expert {moved}: base model" in err and "experts must adapt the same base model" in err


def test_a_folder_that_is_no_run_is_named(tmp_path: Path, finished: Finished, capsys: pytest.CaptureFixture) -> None:
    err = refused(tmp_path, with_outside_experts(tmp_path, [finished.experts["wnut"], tmp_path / "nowhere"]), capsys)
    assert f"expert {tmp_path / 'nowhere'}: not a run folder" in err


def test_two_experts_for_one_task_are_refused(finished: Finished) -> None:
    one = read_expert(finished.experts["wnut"])
    twin = Expert(one.name, one.folder.with_name("twin"), one.config, one.adapter, one.sha256)
    with pytest.raises(InputError, match=r"a second expert for task 'wnut'"):
        check_experts([one, twin])


def test_an_expert_without_its_head_is_named(tmp_path: Path, finished: Finished) -> None:
    """A task whose expert saved no trained head cannot be scored: the build names the expert."""
    headless = copy_expert(finished, "sentiment", tmp_path)
    experts = [read_expert(finished.experts["wnut"]), read_expert(headless)]
    # after read_expert, whose integrity check would call the cut file damaged (tested in tests/test_store)
    weights = headless / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "lora_" in k}, str(weights))
    tokenizer = tokenizer_of(headless)
    with pytest.raises(InputError, match=rf"expert {headless}: no trained head for task 'sentiment'"):
        build_mixture(experts, MixtureSpec(experts="lora"), resolve_model(experts[0].config["model"]), tokenizer, 0)
