"""File records: what a complete set of files looked like, to tell complete from truncated or damaged.

A record maps each file (relative to a folder) to its size and sha256. It is written last, after the
files it describes, so its presence says "complete", and checking it finds a file that was cut short
by a crash, a full disk or a copy, or that changed since. Checkpoints carry one (engine.py), finished
runs keep one in their status (experiment.py), assets in their manifest (assets/core.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Record = dict[str, dict[str, Any]]


def fingerprint(data: dict[str, Any]) -> str:
    """A short stable hash of settings, to tell whether something finished used the same ones."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record(folder: Path, paths: Iterable[Path]) -> Record:
    """{relative path: {bytes, sha256}} of the files among `paths` (folders are walked)."""
    files: list[Path] = []
    for path in paths:
        files += (
            sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        )
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def problem(folder: Path, files: Record, *, deep: bool = True) -> str | None:
    """What is wrong with the recorded files under `folder` (None when every one is as recorded).

    deep=False compares sizes only (cheap: finds missing and truncated files); deep=True also hashes.
    """
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != info["bytes"]:
            return f"{rel} has {path.stat().st_size:,} bytes, recorded {info['bytes']:,}"
        if deep and sha256_file(path) != info["sha256"]:
            return f"{rel} changed since it was written (sha256 differs)"
    return None
