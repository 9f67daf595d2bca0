"""The run directory: layout, atomic writes, run status.

Layout (DESIGN.md):  runs/<experiment>/{experiment.yaml, report.*, results.csv, <run>/...}
Each write goes to a temp file in the same folder and is renamed over the target, so a crash
never leaves a half-written JSON/YAML file and readers see either the old or the new content.
Files and folders get the modes the process umask gives any Unix tool's output (0644 / 0755 under
the usual 022), not the private 0600 of a temp file: colleagues, web servers and Ray workers running
as other users must be able to read results.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from peftlab import faults

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
CHECKPOINT_RECORD = "peftlab-complete.json"  # written last into a Trainer checkpoint: it is complete
STEP, EPOCH = "step", "epoch"  # the kinds of history.jsonl row


def row_kind(row: dict[str, Any]) -> str:
    """A history.jsonl row's kind: `step` (training loss every few steps) or `epoch`; rows written before
    peftlab logged steps have no kind and are epoch rows."""
    return row.get("kind", EPOCH)


def epoch_rows(history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch rows of a history (train and val loss, validation metrics, times)."""
    return [row for row in history if row_kind(row) == EPOCH]


def step_rows(history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step rows of a history (step, fractional epoch, train_loss, lr, grad_norm)."""
    return [row for row in history if row_kind(row) == STEP]


def current_umask() -> int:
    """The process umask (Linux reports it in /proc; elsewhere it is read by setting it back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and everything under a folder) the modes open() and mkdir() would have given.

    Temp files (mkstemp), temp folders (mkdtemp) and files some libraries write through them
    (safetensors) are private (0600 / 0700) and keep that mode through a rename.
    """
    mask = current_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write text or bytes to `path` through a temp file + rename (atomic on POSIX), mode per umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        faults.point(f"write:{path.name}")  # kill point: written, not yet in place
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, default=_jsonable, ensure_ascii=False) + "\n" for r in rows))


def write_yaml(path: Path, data: Any) -> None:
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_text(path: Path, *, max_bytes: int | None = None) -> str:
    """A UTF-8 text file; InputError naming the file (and line) when it cannot be read as one.

    Any file peftlab reads may be hostile or damaged: another encoding, binary, a folder, unreadable,
    or (with max_bytes) far larger than such a file can be.
    """
    from peftlab.errors import InputError

    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise InputError(f"{path}: {path.stat().st_size:,} bytes; a file of this kind has at most {max_bytes:,}")
        data = path.read_bytes()
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a file") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not valid UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def parse_json(text: str, where: str, line: int | None = None) -> Any:
    """json.loads with an InputError naming `where` and the line (`line`: the text is that line of
    a file) for invalid or absurdly deep JSON."""
    from peftlab.errors import InputError

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = line if line is not None else exc.lineno
        raise InputError(f"{where}:{at}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{where}{'' if line is None else f':{line}'}: JSON nested too deep") from None


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file (default when it does not exist); InputError naming it when it is damaged."""
    try:
        return parse_json(read_text(path), str(path))
    except FileNotFoundError:
        return default


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file ([] if missing). Splits on \\n only: str.splitlines() would also split
    inside texts that contain Unicode line separators (U+2028, U+0085), which tweets do."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if line.strip():
            rows.append(parse_json(line, str(path), line=number))
    return rows


def _jsonable(value: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _yaml_file(path: Path) -> dict[str, Any]:
    """A YAML mapping peftlab wrote ({} when missing); InputError naming it when damaged."""
    if not path.exists():
        return {}
    from peftlab.errors import InputError

    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: damaged ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: damaged (expected a mapping)")
    return data


class RunDir:
    """One run's folder and its files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    status_file = property(lambda self: self.path / "status.json")
    config_file = property(lambda self: self.path / "config.yaml")
    metrics_file = property(lambda self: self.path / "metrics.json")
    history_file = property(lambda self: self.path / "history.jsonl")
    adapter_dir = property(lambda self: self.path / "adapter")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    predictions_dir = property(lambda self: self.path / "predictions")

    def status(self) -> dict[str, Any]:
        return read_json(self.status_file, {"state": PENDING})

    def set_status(self, state: str, **extra: Any) -> None:
        status = {**self.status(), "state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        if state != FAILED:
            status.pop("error", None)
        write_json(self.status_file, status)

    def unfinished(self) -> str | None:
        """Why this folder is not a finished run with its trained model (None: it is one). Export,
        reloading and mixtures check this before anything else, each naming the folder its own way."""
        if not self.config_file.exists():
            return "not a run folder (no config.yaml); expected runs/<experiment>/<run>/"
        state = self.status().get("state")
        if state != DONE:
            return f"the run is not finished (status: {state}); run the experiment again to complete it"
        if not self.adapter_dir.is_dir():
            return "the run saved no model (no adapter/; sweep points keep none)"
        return None

    def damage(self, *, deep: bool = True) -> str | None:
        """What is wrong with a finished run's files (None when intact, or when the run is not done).

        A run becomes `done` with a record of its metrics, predictions and adapter (their sizes and
        sha256); a file missing, cut short or changed since is damage. Runs finished before peftlab
        kept records are trusted as they are.
        """
        from peftlab import integrity
        from peftlab.errors import InputError

        try:
            status = self.status()
            if status.get("state") != DONE:
                return None
            files = status.get("files")
            return None if files is None else integrity.problem(self.path, files, deep=deep)
        except InputError as exc:
            return str(exc)

    def record_done(self, **extra: Any) -> None:
        """Mark the run done, with the record of the files that make it complete."""
        from peftlab import integrity

        parts = [self.metrics_file, self.predictions_dir, self.adapter_dir]
        self.set_status(DONE, files=integrity.record(self.path, parts), **extra)

    def config(self) -> dict[str, Any]:
        return _yaml_file(self.config_file)

    def metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_file, {})

    def history(self, kind: str | None = None) -> list[dict[str, Any]]:
        """history.jsonl's rows: all (kind None), or only `epoch` (also old rows without a kind) or `step` rows."""
        rows = read_jsonl(self.history_file)
        return rows if kind is None else [row for row in rows if row_kind(row) == kind]

    def latest_checkpoint(self, warn: Callable[[str], None] = print) -> Path | None:
        """The newest Trainer checkpoint that is complete and intact (its record written and matching).

        A checkpoint cut short by a crash, or damaged since, is said and deleted (so that the Trainer's
        own checkpoint rotation never keeps it over a good one); the one before it is used, or none.
        """
        import shutil

        from peftlab import integrity

        if not self.checkpoints_dir.exists():
            return None
        found = [p for p in self.checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        for folder in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
            try:
                files = read_json(folder / CHECKPOINT_RECORD)
                problem = "it was not finished" if files is None else integrity.problem(folder, files)
            except Exception as exc:  # a damaged record
                problem = str(exc)
            if problem is None:
                return folder
            warn(f"{folder.name} is incomplete or damaged ({problem}): skipped and removed")
            shutil.rmtree(folder, ignore_errors=True)
        return None


class ExperimentDir:
    """runs/<experiment>/: the experiment's runs, baselines and report."""

    BASELINES = "_baselines"

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    def runs(self) -> list[RunDir]:
        """Run folders (those with a config.yaml, not moved aside) in the order the experiment lists
        them; the points of a sweep after their method entry, in grid order."""
        order = list((self.experiment().get("methods") or {}).keys())
        found = [run for run in self._folders() if run.damage() is None]  # damaged runs: see damaged()
        rank = {name: i for i, name in enumerate(order)}

        def key(run: RunDir) -> tuple[int, int, str]:
            meta = run.config().get("sweep") or {}
            return rank.get(meta.get("base", run.name), len(rank)), int(meta.get("index", 0)), run.name

        return sorted(found, key=key)

    def damaged(self) -> dict[str, str]:
        """Finished runs whose files are missing, cut short or changed: run name -> what is wrong."""
        return {run.name: problem for run in self._folders() if (problem := run.damage()) is not None}

    def _folders(self) -> list[RunDir]:
        """Run folders: those with a config.yaml, not moved aside by --fresh."""
        return [
            RunDir(p)
            for p in self.path.iterdir()
            if p.is_dir() and (p / "config.yaml").exists() and ".replaced-" not in p.name
        ]

    def experiment(self) -> dict[str, Any]:
        path = self.path / "experiment.yaml"
        return _yaml_file(path)

    @property
    def baselines_file(self) -> Path:
        return self.path / self.BASELINES / "metrics.json"

    def baselines_for(self, group: str) -> Path:
        """Baselines of one (model, task) group of a multi-task experiment ('' = the experiment's own)."""
        return self.path / self.BASELINES / group / "metrics.json" if group else self.baselines_file


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temp files of atomic writes that a killed process left (call it holding the lock)."""
    stale = [p for p in folder.rglob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


class ExperimentLock:
    """One `peftlab run` writes an experiment folder at a time.

    An advisory lock (flock) on `<folder>/.lock`, which also records who holds it (pid, host, start,
    command). The kernel releases the lock when its process dies, however it dies, so a lock is never
    stale: a lock file whose holder died is taken over (and said). A second `run` on a held folder
    fails (InputError naming the holder) or, with wait=True, waits. Workers and Ray tasks write only
    their own run folders and take no lock; `report`, `eval` and `plan` need none.
    flock works between processes of one host (and on most network filesystems between hosts; where
    it does not, runs on two hosts are not kept apart).
    """

    NAME = ".lock"

    def __init__(self, folder: Path, *, wait: bool = False, log: Callable[[str], None] = print) -> None:
        self.path = folder / self.NAME
        self.wait = wait
        self.log = log
        self.handle: Any = None

    def __enter__(self) -> ExperimentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._describe(self._holder(handle))
            if not self.wait:
                handle.close()
                from peftlab.errors import InputError

                raise InputError(
                    f"{self.path.parent} is being written by {holder}; nothing was started. Wait for it to "
                    "finish (or stop it), or pass --wait to start when it does"
                ) from None
            self.log(f"waiting for {holder} to finish writing {self.path.parent} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        previous = self._holder(handle)
        if previous.get("pid") and not _alive(previous):
            self.log(f"took over the lock of {self._describe(previous)}, which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_me()) + "\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()  # released cleanly: nobody to take over from
            self.handle.flush()
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    @staticmethod
    def _holder(handle: Any) -> dict[str, Any]:
        handle.seek(0)
        try:
            data = json.loads(handle.read() or "{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _describe(holder: dict[str, Any]) -> str:
        if not holder:
            return "another peftlab process"
        return (
            f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}: {holder.get('command')})"
        )


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(["peftlab", *sys.argv[1:]]) if sys.argv else "peftlab",
    }


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the recorded holder still runs (on another host: assumed so, it cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True
