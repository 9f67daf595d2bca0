"""How runs are executed: in this process, each in a fresh worker process (the default), or as Ray tasks.

Why a process per run: a crash (even a segfault in a native kernel) takes down one run, not the
experiment; and a run's peak memory is its own process's peak resident memory, which is an honest
figure. Measured in one long process, memory freed by an earlier run stays mapped and the next
run's peak is misstated. `--workers N` runs N worker processes at once, each with cores/N threads.

A worker is `python -m peftlab.worker` with the experiment file, the --set overrides and the run
(its resolved RunSpec: sweep points and selected runs need not be named in the file); it validates
the same experiment, trains that run and exits. `inline` runs everything in the calling process
(the tests use it: no interpreter start per run).

`ray` submits each run as a Ray task (`executor: {name: ray, address: ..., num_cpus: ...}`): to an
existing cluster (`ray.init(address=...)`, or RAY_ADDRESS) or to a local Ray instance started for
the experiment. Each task declares its resources (CPUs, GPUs, memory) and Ray decides where and
when it runs: peftlab has no scheduler of its own. A task runs in a fresh Ray worker process
(`max_calls=1`) for the same reasons as above, and does what a worker process does. The nodes must
see the same paths as the driver (the experiment file, local data, output_dir: a shared filesystem)
and have peftlab installed with the assets fetched.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config import ExecutorSpec, RunSpec
from peftlab.distributed import launch_argv, world_size
from peftlab.errors import InputError
from peftlab.store import FAILED, RunDir

Log = Callable[[str], None]
EXECUTORS = ("process", "inline", "ray")
# Passed on to Ray workers (a cluster's workers do not inherit the driver's environment).
RAY_ENV = ("PEFTLAB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs to rebuild the experiment and train one run."""

    experiment: str
    overrides: list[str] = field(default_factory=list)
    run: str = ""
    threads: int | None = None
    spec: dict | None = None  # RunSpec.to_dict()
    cwd: str = ""  # relative paths (output_dir, data) are read from here
    nproc: int = 1  # data-parallel processes for the run (executor.nproc_per_run; see distributed.py)

    def argv(self) -> list[str]:
        return launch_argv(self.nproc, "peftlab.worker", json.dumps(self.__dict__))


def run_in_processes(jobs: list[tuple[WorkerJob, RunDir]], workers: int, log: Log) -> list[str]:
    """Run jobs in up to `workers` processes at once; return the names of failed runs."""
    pending = list(jobs)
    active: list[tuple[Any, WorkerJob, RunDir]] = []
    failed: list[str] = []
    try:
        while pending or active:
            while pending and len(active) < workers:
                job, folder = pending.pop(0)
                active.append((start_worker(job), job, folder))
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


def start_worker(job: WorkerJob) -> Any:
    """Start the job's worker process: forked from the preloaded server where that is safe, else
    `python -m peftlab.worker` (or torchrun for a data-parallel run). Both answer poll/terminate/wait."""
    if job.nproc == 1 and _forkable():
        import multiprocessing

        from peftlab.worker import forked

        process = multiprocessing.get_context("forkserver").Process(
            target=forked, args=(json.dumps(job.__dict__),), name=f"peftlab-worker-{job.run}"
        )
        process.start()
        return _Forked(process)
    return subprocess.Popen(job.argv(), env={**os.environ, "PYTHONUNBUFFERED": "1", **thread_env(job.threads)})


def thread_env(threads: int | None) -> dict[str, str]:
    """The variables that give a worker `threads` torch threads (none: torch's default, every core)."""
    return {"OMP_NUM_THREADS": str(threads), "PEFTLAB_THREADS": str(threads)} if threads else {}


# Why a fork server: a fresh `python -m peftlab.worker` spends about 7 s of its start importing torch,
# transformers, datasets and PEFT (measured on 2 CPU cores), once per run. multiprocessing's fork server
# imports them once, before any computation (no thread pools or CUDA state to inherit), and forks
# each worker from there: still one fresh process per run (its own crash, its own peak memory).
PRELOAD = ("peftlab.preload",)  # quiets the libraries, then imports them
_server_env: dict[str, str] | None = None  # the environment the fork server was started with
_forked: weakref.WeakSet[_Forked] = weakref.WeakSet()  # workers forked from it (their exit codes come through it)


def prestart_workers() -> None:
    """Start the fork server now (where workers are forked), so that its imports overlap other work."""
    _forkable()


def _forkable() -> bool:
    """Fork workers from the preloaded server: on Linux without CUDA (a CUDA context must not be
    inherited, and the libraries probe CUDA on import). The server runs with this process's current
    environment (libraries read HF_HOME and the like when they are imported): after a change it is
    restarted, or, while workers forked from it still run, a worker process is started instead."""
    global _server_env
    import multiprocessing
    import sys

    import torch

    if os.environ.get("PEFTLAB_FORK_WORKERS", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if torch.cuda.is_available():
        return False
    current = dict(os.environ)
    if current == _server_env:
        return True
    if _server_env is not None and (any(w.poll() is None for w in _forked) or not _stop_server()):
        return False
    multiprocessing.set_forkserver_preload(list(PRELOAD))
    from multiprocessing import forkserver

    forkserver.ensure_running()
    _server_env = current
    return True


def _stop_server() -> bool:
    """Stop the fork server (its forked workers have ended); False where this Python cannot."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)  # the stdlib's own tests use it
    if stop is None:
        return False
    stop()
    return True


class _Forked:
    """A worker forked from the fork server, answering as subprocess.Popen does."""

    def __init__(self, process: Any) -> None:
        self.process = process
        _forked.add(self)

    def poll(self) -> int | None:
        return None if self.process.is_alive() else self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def wait(self) -> int | None:
        self.process.join()
        return self.process.exitcode


def _mark_crashed(folder: RunDir, code: int | str, log: Log) -> None:
    """A worker that died before recording its failure (killed, segfault) is marked failed here."""
    if folder.status().get("state") != FAILED:
        folder.set_status(FAILED, error=f"worker process ended with {code}; run again to resume")
        log(f"[{folder.name}] FAILED: worker ended with {code}")


def threads_per_worker(workers: int) -> int | None:
    """Split the cores between parallel worker processes (None: leave torch's default for a single one)."""
    if workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def jobs_for(
    path: Path, overrides: list[str], runs: list[RunSpec], folders: list[RunDir], workers: int, nproc: int = 1
) -> list[tuple[WorkerJob, RunDir]]:
    threads = threads_per_worker(workers * nproc)
    return [
        (WorkerJob(str(path.resolve()), list(overrides), run.name, threads, run.to_dict(), os.getcwd(), nproc), folder)
        for run, folder in zip(runs, folders, strict=True)
    ]


def run_in_ray(jobs: list[tuple[WorkerJob, RunDir]], spec: ExecutorSpec, log: Log) -> list[str]:
    """Run each job as a Ray task with its declared resources; return the names of failed runs."""
    if not jobs:
        return []
    try:
        import ray
    except ImportError:
        raise InputError("executor ray: Ray is not installed; install the extra: pip install 'peftlab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(**_ray_init_kwargs(spec))
    resources = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
    if spec.memory_gb:
        resources["memory"] = int(spec.memory_gb * 2**30)
    task = ray.remote(max_calls=1, max_retries=0)(ray_task).options(**resources)
    threads = max(1, int(spec.num_cpus))
    pending = {task.remote(json.dumps({**job.__dict__, "threads": threads})): (job, folder) for job, folder in jobs}
    log(f"ray: {len(pending)} run(s) submitted, each with {_describe(resources)}")
    failed: list[str] = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job, folder = pending.pop(done[0])
            try:
                code: int | str = ray.get(done[0])
            except Exception as exc:  # the task's process died (RayTaskError, WorkerCrashedError, ...)
                lines = [line for line in str(exc).splitlines() if line.strip()]  # the last: the cause
                code = f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
            if code != 0:
                failed.append(job.run)
                _mark_crashed(folder, code, log)
    except KeyboardInterrupt:
        for ref, (_, folder) in pending.items():
            ray.cancel(ref, force=True)
            _mark_crashed(folder, "interrupted", log)
        raise
    finally:
        if started:
            ray.shutdown()
    return failed


def check_launch(kind: str, nproc: int) -> None:
    """Data-parallel runs need a worker process per run; `peftlab run` itself is one process."""
    if nproc > 1 and kind == "inline":
        raise InputError(
            f"executor.nproc_per_run: {nproc} processes per run need the process or ray executor "
            "(each run's worker is started under torchrun); not --executor inline"
        )
    if world_size() > 1:
        raise InputError(
            "peftlab run was started under torchrun or accelerate launch (WORLD_SIZE is set): run it as one "
            "process and set executor.nproc_per_run (e.g. --set executor.nproc_per_run=2); peftlab starts "
            "each run's worker under torchrun itself"
        )


def require_ray() -> Any:
    """The ray module, or an InputError saying how to install it (checked before anything runs)."""
    try:
        import ray
    except ImportError:
        raise InputError("executor ray: Ray is not installed; install the extra: pip install 'peftlab[ray]'") from None
    return ray


def _ray_init_kwargs(spec: ExecutorSpec) -> dict:
    env = {k: os.environ[k] for k in RAY_ENV if k in os.environ}
    kwargs: dict = {"address": spec.address, "runtime_env": {"env_vars": env}, "log_to_driver": True}
    if spec.address is None and "RAY_ADDRESS" not in os.environ:
        kwargs["include_dashboard"] = False  # a local instance for this experiment only
    return kwargs


def _describe(resources: dict) -> str:
    return ", ".join(f"{k.removeprefix('num_')} {v:g}" for k, v in resources.items() if v)


def ray_task(job_json: str) -> int:
    """The body of one Ray task: train one run as a worker process would; returns its exit code."""
    job = WorkerJob(**json.loads(job_json))
    if job.nproc > 1:  # data-parallel: torchrun starts the processes (threads split between them)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **thread_env(max(1, (job.threads or 1) // job.nproc))}
        return subprocess.run(job.argv(), env=env, check=False).returncode
    os.environ.update(thread_env(job.threads))
    from peftlab.worker import run_job

    return run_job(job)
