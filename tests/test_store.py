"""The run store: atomic writes whose files follow the umask, and the one-writer lock."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from peftlab.store import current_umask, follow_umask, write_json
from tests.conftest import tiny_experiment, write_experiment


@pytest.fixture
def umask() -> Iterator[callable]:
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path: Path, umask) -> None:
    umask(0o022)
    assert current_umask() == 0o022
    write_json(tmp_path / "a" / "metrics.json", {"x": 1})
    assert mode(tmp_path / "a" / "metrics.json") == 0o644 and mode(tmp_path / "a") == 0o755
    umask(0o077)
    write_json(tmp_path / "b.json", {"x": 1})
    assert mode(tmp_path / "b.json") == 0o600


def test_follow_umask_opens_up_private_temp_output(tmp_path: Path, umask) -> None:
    umask(0o002)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    (folder / "adapter_model.safetensors").chmod(0o600)  # as safetensors leaves it
    (folder / "sub").mkdir(mode=0o700)
    follow_umask(folder)
    assert mode(folder / "adapter_model.safetensors") == 0o664 and mode(folder / "sub") == 0o775


def test_every_file_of_a_run_is_readable_by_others(tmp_path: Path, umask) -> None:
    umask(0o022)
    exp = tiny_experiment(tmp_path, methods={"lora": {"r": 2}}, train={"epochs": 1, "batch_size": 8, "precision": "fp32"})
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lambda m: None)
    assert code == EXIT_OK
    root = tmp_path / "runs" / "tiny"
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"adapter_model.safetensors", "metrics.json", "status.json", "report.html", "results.csv"} <= names
    private = [str(p.relative_to(root)) for p in files if mode(p) != 0o644]
    assert private == []
    assert all(mode(p) == 0o755 for p in root.rglob("*") if p.is_dir())
