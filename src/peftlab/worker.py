"""`python -m peftlab.worker JOB_JSON`: train one run of an experiment in its own process.

Started by the process executor (executor.py). The worker re-validates the experiment file with
the same overrides, prepares the data of the run's (model, task) group and trains the one run
(its resolved RunSpec comes with the job: sweep points and selected runs are not in the file). If
its parent dies (killed, closed terminal), the worker exits too instead of training on unseen; the
run's last checkpoint remains and the next `peftlab run` resumes it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from peftlab import distributed
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED, InputError

if TYPE_CHECKING:
    from peftlab.config import RunSpec
    from peftlab.executor import WorkerJob
    from peftlab.experiment import Prepared


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(EXIT_RUN_FAILED)

    threading.Thread(target=watch, daemon=True, name="peftlab-parent-watch").start()


def run_job(job: WorkerJob) -> int:
    """Train the job's run in this process (a worker process or a Ray task); return an exit code."""
    from peftlab.cli import quiet_libraries
    from peftlab.config import RunSpec, load_experiment
    from peftlab.engine import set_threads
    from peftlab.experiment import execute_run, log_line, prepare

    quiet_libraries()
    set_threads()
    distributed.setup()  # data-parallel (started under torchrun): join the run's process group
    if job.cwd:
        os.chdir(job.cwd)
    try:
        exp = load_experiment(job.experiment, job.overrides, only=None if job.spec else [job.run])
        run = RunSpec.from_dict(job.spec) if job.spec else exp.runs[0]
        prep = prepare(exp.group_of(run), log=lambda message: None)  # only the run's (model, task) group
    except InputError as exc:
        print(f"peftlab worker: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if distributed.is_replica():
            return EXIT_OK if _replica(prep, run) else EXIT_RUN_FAILED
        return EXIT_OK if execute_run(prep, run, log_line) else EXIT_RUN_FAILED
    finally:
        distributed.teardown()


def _replica(prep: Prepared, run: RunSpec) -> bool:
    """Rank > 0 of a data-parallel run: the same steps as rank 0, quietly, its files in a temporary
    folder that is deleted at the end (rank 0 alone writes the run folder; see distributed.py)."""
    from peftlab.experiment import execute_run
    from peftlab.store import ExperimentDir

    with tempfile.TemporaryDirectory(prefix=f"peftlab-rank{distributed.rank()}-") as tmp:
        return execute_run(replace(prep, store=ExperimentDir(Path(tmp))), run, lambda message: None)


def main(argv: list[str]) -> int:
    from peftlab.cli import quiet_libraries

    quiet_libraries()  # before the executor's imports pull in PEFT and bitsandbytes (import-time warnings)
    from peftlab.executor import WorkerJob

    _exit_with_parent()
    return run_job(WorkerJob(**json.loads(argv[0])))


def forked(job_json: str) -> None:
    """A worker forked from the executor's preloaded fork server: what `python -m peftlab.worker` does,
    with the job's thread count and line-buffered output (a Popen'd worker gets both from its environment)."""
    from peftlab.executor import thread_env

    os.environ.update(thread_env(json.loads(job_json).get("threads")))
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    raise SystemExit(main([job_json]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
