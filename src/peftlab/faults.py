"""Deterministic kill points, for the crash-safety tests (tests/test_crash_safety.py).

`PEFTLAB_KILL_AT=NAME[:N]` makes the process SIGKILL itself the Nth time (default: the first) it
reaches the point NAME: no cleanup, no `finally`, exactly as a power cut or the OOM killer would
end it. Points sit between the steps whose order matters for consistency (data preparation,
baselines, training steps, checkpoint writes, evaluation, predictions, the adapter, metrics, status,
report, and inside every atomic write). Without the variable a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PEFTLAB_KILL_AT"
_reached: dict[str, int] = {}


def point(name: str) -> None:
    """Kill this process here if PEFTLAB_KILL_AT names this point (and this is its Nth visit)."""
    target = os.environ.get(ENV)
    if not target:
        return
    wanted, _, count = target.rpartition(":")
    if not count.isdigit():  # no count: the whole value is the name (names may contain ':')
        wanted, count = target, "1"
    if wanted != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
