"""How runs are executed: in this process, or each in a fresh worker process (the default).

Why a process per run: a crash (even a segfault in a native kernel) takes down one run, not the
experiment; and a run's peak memory is its own process's peak resident memory, which is an honest
figure. Measured in one long process, memory freed by an earlier run stays mapped and the next
run's peak is misstated. `--workers N` runs N worker processes at once, each with cores/N threads.

A worker is `python -m peftlab.worker` with the experiment file, the --set overrides and one run
name; it validates the same experiment, trains that run and exits. `inline` runs everything in the
calling process (the tests use it: no interpreter start per run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peftlab.config import RunSpec
from peftlab.store import FAILED, RunDir

Log = Callable[[str], None]
EXECUTORS = ("process", "inline")


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs to rebuild the experiment and train one run."""

    experiment: str
    overrides: list[str] = field(default_factory=list)
    run: str = ""
    threads: int | None = None

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "peftlab.worker", json.dumps(self.__dict__)]


def run_in_processes(jobs: list[tuple[WorkerJob, RunDir]], workers: int, log: Log) -> list[str]:
    """Run jobs in up to `workers` processes at once; return the names of failed runs."""
    pending = list(jobs)
    active: list[tuple[subprocess.Popen, WorkerJob, RunDir]] = []
    failed: list[str] = []
    try:
        while pending or active:
            while pending and len(active) < workers:
                job, folder = pending.pop(0)
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                if job.threads:
                    env["OMP_NUM_THREADS"] = env["PEFTLAB_THREADS"] = str(job.threads)
                active.append((subprocess.Popen(job.argv(), env=env), job, folder))
            time.sleep(0.2)
            for proc, job, folder in list(active):
                code = proc.poll()
                if code is None:
                    continue
                active.remove((proc, job, folder))
                if code != 0:
                    failed.append(job.run)
                    _mark_crashed(folder, code, log)
    except KeyboardInterrupt:
        for proc, _, folder in active:
            proc.terminate()
            proc.wait()
            _mark_crashed(folder, "interrupted", log)
        raise
    return failed


def _mark_crashed(folder: RunDir, code: int | str, log: Log) -> None:
    """A worker that died before recording its failure (killed, segfault) is marked failed here."""
    if folder.status().get("state") != FAILED:
        folder.set_status(FAILED, error=f"worker process ended with {code}; run again to resume")
        log(f"[{folder.name}] FAILED: worker process ended with {code}")


def threads_per_worker(workers: int) -> int | None:
    """Split the cores between parallel workers (None: leave torch's default for a single worker)."""
    if workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def jobs_for(
    path: Path, overrides: list[str], runs: list[RunSpec], folders: list[RunDir], workers: int
) -> list[tuple[WorkerJob, RunDir]]:
    threads = threads_per_worker(workers)
    return [
        (WorkerJob(str(path), list(overrides), run.name, threads), folder)
        for run, folder in zip(runs, folders, strict=True)
    ]
