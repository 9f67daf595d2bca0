"""Executors: parallel worker processes (--workers) and Ray tasks on a Ray cluster started by the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab import executor
from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK, EXIT_RUN_FAILED, InputError
from peftlab.experiment import run_experiment
from tests.conftest import tiny_experiment, write_experiment

FAST = {"epochs": 1, "batch_size": 16, "precision": "fp32"}


def sweep_experiment(tmp_path: Path, **changes) -> dict:
    exp = tiny_experiment(tmp_path, methods={"lora": {}}, train=FAST, sweep={"grid": {"lora.r": [2, 4]}}, **changes)
    exp["evaluate"] = {"baselines": False, "splits": ["validation"]}
    return exp


def test_workers_run_points_in_parallel_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --workers 2 the second worker starts while the first is still alive, each with half the cores."""
    started: list[tuple[object, dict, bool]] = []
    real_start = executor.start_worker

    def start(job: executor.WorkerJob) -> object:
        others_alive = any(p.poll() is None for p, _, _ in started)
        proc = real_start(job)
        started.append((proc, dict(job.__dict__), others_alive))
        return proc

    monkeypatch.setattr(executor, "start_worker", start)
    path = write_experiment(tmp_path, sweep_experiment(tmp_path))
    lines: list[str] = []
    assert run_experiment(load_experiment(path), executor="process", workers=2, log=lines.append) == EXIT_OK
    assert [job["run"] for _, job, _ in started] == ["lora-r2", "lora-r4"]
    assert started[1][2], "the second worker started only after the first had ended"
    assert all(job["threads"] == max(1, (os.cpu_count() or 1) // 2) for _, job, _ in started)
    for name in ("lora-r2", "lora-r4"):
        metrics = json.loads((tmp_path / "runs" / "tiny" / name / "metrics.json").read_text())
        assert metrics["settings"]["r"] == int(name[-1])
        assert metrics["hardware"]["cpu_threads"] == started[0][1]["threads"]


def test_workers_fork_from_the_preloaded_server_and_a_killed_one_is_marked_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without CUDA, workers are forked from the fork server (no interpreter start and imports per run);
    one killed mid-run is a failed run with its signal, the other run is unaffected."""
    if not executor._forkable():
        pytest.skip("workers are not forked here (CUDA, not Linux, or the environment changed)")
    real_start = executor.start_worker
    kinds: list[str] = []

    def start(job: executor.WorkerJob) -> object:
        proc = real_start(job)
        kinds.append(type(proc).__name__)
        if job.run == "lora-r2":
            os.kill(proc.process.pid, signal.SIGKILL)
        return proc

    monkeypatch.setattr(executor, "start_worker", start)
    path = write_experiment(tmp_path, sweep_experiment(tmp_path))
    lines: list[str] = []
    assert run_experiment(load_experiment(path), executor="process", log=lines.append) == EXIT_RUN_FAILED
    assert kinds == ["_Forked", "_Forked"]
    status = json.loads((tmp_path / "runs" / "tiny" / "lora-r2" / "status.json").read_text())
    assert status["state"] == "failed" and "ended with -9" in status["error"]
    assert json.loads((tmp_path / "runs" / "tiny" / "lora-r4" / "status.json").read_text())["state"] == "done"


def _exit_zero_if_set(name: str) -> None:
    raise SystemExit(0 if os.environ.get(name) == "1" else 3)


def test_the_fork_server_restarts_when_the_environment_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Libraries read some variables (HF_HOME, ...) when imported: a worker must not be forked from a
    server started with an older environment."""
    import multiprocessing

    if not executor._forkable():
        pytest.skip("workers are not forked here")
    monkeypatch.setenv("PEFTLAB_TEST_CHANGED", "1")
    assert executor._forkable()
    child = multiprocessing.get_context("forkserver").Process(target=_exit_zero_if_set, args=("PEFTLAB_TEST_CHANGED",))
    child.start()
    child.join()
    assert child.exitcode == 0


def test_ray_executor_runs_points_as_tasks_on_an_existing_cluster(tmp_path: Path) -> None:
    """A Ray head node started here; `peftlab run` (another process) joins it with ray.init(address=...)."""
    cluster_utils = pytest.importorskip("ray.cluster_utils", reason="the ray extra is not installed")
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 80 * 2**20},
    )
    try:
        exp = sweep_experiment(tmp_path)
        exp["executor"] = {"name": "ray", "address": cluster.address, "num_cpus": 1}
        path = write_experiment(tmp_path, exp)
        result = subprocess.run(
            [sys.executable, "-m", "peftlab", "run", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cluster.shutdown()
    assert result.returncode == EXIT_OK, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ray: 2 run(s) submitted, each with cpus 1" in result.stdout
    root = tmp_path / "runs" / "tiny"
    for name in ("lora-r2", "lora-r4"):
        assert json.loads((root / name / "status.json").read_text())["state"] == "done"
        metrics = json.loads((root / name / "metrics.json").read_text())
        assert metrics["hardware"]["cpu_threads"] == 1  # the task's declared CPUs set its torch threads
        assert metrics["memory"]["peak_mib"] > 0 and metrics["eval"]["validation"]["n"] == 12
    assert "lora-r4" in (root / "report.md").read_text()


def test_ray_executor_without_ray_is_an_input_error_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = write_experiment(tmp_path, sweep_experiment(tmp_path))
    with pytest.raises(InputError, match=r"pip install 'peftlab\[ray\]'"):
        run_experiment(load_experiment(path), executor="ray", log=lambda m: None)
    assert not (tmp_path / "runs").exists()
