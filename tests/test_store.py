"""The run store: atomic writes whose files follow the umask, and the one-writer lock."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK, InputError
from peftlab.experiment import run_experiment
from peftlab.store import ExperimentLock, RunDir, current_umask, follow_umask, write_json
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
    exp = tiny_experiment(
        tmp_path, methods={"lora": {"r": 2}}, train={"epochs": 1, "batch_size": 8, "precision": "fp32"}
    )
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lambda m: None)
    assert code == EXIT_OK
    root = tmp_path / "runs" / "tiny"
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"adapter_model.safetensors", "metrics.json", "status.json", "report.html", "results.csv"} <= names
    private = [str(p.relative_to(root)) for p in files if mode(p) != 0o644]
    assert private == []
    assert all(mode(p) == 0o755 for p in root.rglob("*") if p.is_dir())


HOLD = """
import sys, time
from pathlib import Path
from peftlab.store import ExperimentLock
with ExperimentLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_experiment_exits_naming_the_holder(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, methods={"lora": {"r": 2}})
    loaded = load_experiment(write_experiment(tmp_path, exp))
    proc = holder(loaded.runs_dir, 30)
    try:
        with pytest.raises(InputError, match=rf"being written by pid {proc.pid} on {socket.gethostname()}"):
            run_experiment(loaded, executor="inline", log=lambda m: None)
        assert not (loaded.runs_dir / "lora").exists()  # nothing was started
    finally:
        proc.kill()
        proc.wait()


def test_wait_queues_behind_the_holder(tmp_path: Path) -> None:
    exp = tiny_experiment(
        tmp_path, methods={"lora": {"r": 2}}, train={"epochs": 1, "batch_size": 8, "precision": "fp32"}
    )
    exp["evaluate"] = {"baselines": False}
    loaded = load_experiment(write_experiment(tmp_path, exp))
    proc = holder(loaded.runs_dir, 1.5)
    lines: list[str] = []
    assert run_experiment(loaded, executor="inline", wait=True, log=lines.append) == EXIT_OK
    assert any(line.startswith(f"waiting for pid {proc.pid}") for line in lines)
    assert proc.wait() == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder.mkdir()
    (folder / ExperimentLock.NAME).write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x", "command": "peftlab run"})
    )
    lines: list[str] = []
    with ExperimentLock(folder, log=lines.append):
        held = json.loads((folder / ExperimentLock.NAME).read_text())
        assert held["pid"] == os.getpid()
    assert lines == [
        f"took over the lock of pid {int(dead.stdout)} on {socket.gethostname()} (since x: peftlab run), "
        "which is no longer running"
    ]
    assert (folder / ExperimentLock.NAME).read_text() == ""  # released cleanly


def test_unfinished_names_what_a_folder_lacks_to_be_a_finished_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "lora")
    run.path.mkdir()
    assert run.unfinished().startswith("not a run folder (no config.yaml)")
    run.config_file.write_text("method: lora\n")
    run.set_status("running")
    assert run.unfinished().startswith("the run is not finished (status: running)")
    run.set_status("done")
    assert run.unfinished().startswith("the run saved no model (no adapter/")
    run.adapter_dir.mkdir()
    assert run.unfinished() is None
