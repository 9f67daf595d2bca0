"""`python -m peftlab.worker JOB_JSON`: train one run of an experiment in its own process.

Started by the process executor (executor.py). The worker re-validates the experiment file with
the same overrides, prepares the data and trains the one run. If its parent dies (killed, closed
terminal), the worker exits too instead of training on unseen; the run's last checkpoint remains
and the next `peftlab run` resumes it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED, InputError


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(EXIT_RUN_FAILED)

    threading.Thread(target=watch, daemon=True, name="peftlab-parent-watch").start()


def main(argv: list[str]) -> int:
    from peftlab.cli import quiet_libraries
    from peftlab.config import load_experiment
    from peftlab.executor import WorkerJob
    from peftlab.experiment import execute_run, log_line, prepare

    _exit_with_parent()
    quiet_libraries()
    job = WorkerJob(**json.loads(argv[0]))
    try:
        exp = load_experiment(job.experiment, job.overrides, only=[job.run])
        prep = prepare(exp.groups()[0], log=lambda message: None)  # the one (model, task) group of the run
    except InputError as exc:
        print(f"peftlab worker: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK if execute_run(prep, prep.exp.runs[0], log_line) else EXIT_RUN_FAILED


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
