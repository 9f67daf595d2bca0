"""Load an experiment's data into train/validation/test `datasets.Dataset`s of raw rows.

Sources: `asset:NAME` (normalised JSONL in the asset cache), a local file or folder (json, jsonl,
csv, CoNLL columns, or a SQuAD JSON document, see squad.py; a folder holds train/validation/test
files), explicit `files:` per split, or a hub dataset id (`datasets.load_dataset`). A source
without a validation split gets one carved (seeded) from train. Limits keep the first N rows of a
seeded shuffle, so a limit is a random sample that is the same on every machine. Tasks then map
the raw rows to their canonical fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from peftlab.config import SPLITS, DataSpec
from peftlab.errors import InputError
from peftlab.store import read_jsonl

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".conll": "conll"}


def load_splits(spec: DataSpec, base_dir: Path | None = None, needed: tuple[str, ...] = SPLITS) -> DatasetDict:
    """The experiment's splits as raw rows, with derived validation and limits applied."""
    raw, where = _load_source(spec, base_dir or Path.cwd())
    raw = {ours: raw[theirs] for ours, theirs in _split_names(spec, raw, where).items()}
    if "validation" not in raw and "train" in raw and "validation" in needed:
        cut = raw["train"].train_test_split(test_size=spec.validation_fraction, seed=spec.seed, shuffle=True)
        raw["train"], raw["validation"] = cut["train"], cut["test"]
    missing = [s for s in needed if s not in raw]
    if missing:
        raise InputError(
            f"{where}: no {', '.join(missing)} split (found: {', '.join(raw) or 'none'}); "
            "name the files with data.files, map split names with data.splits, or drop the split "
            "from evaluate.splits"
        )
    out = DatasetDict({name: raw[name] for name in SPLITS if name in raw})
    _check_and_limit(spec, out, where)
    return out


def describe_source(spec: DataSpec) -> str:
    return spec.source + (f" ({spec.config_name})" if spec.config_name else "")


def _split_names(spec: DataSpec, raw: dict[str, Dataset], where: str) -> dict[str, str]:
    """Our split name -> the source's split name (explicit `data.splits`, else same name, 'dev')."""
    names = {}
    for ours in SPLITS:
        theirs = spec.splits.get(ours)
        if theirs is not None and theirs not in raw:
            raise InputError(
                f"{where}: data.splits.{ours}: the source has no split '{theirs}' (it has: {', '.join(raw)})"
            )
        if theirs is None:
            theirs = next((n for n in (ours, {"validation": "dev"}.get(ours)) if n in raw), None)
        if theirs is not None:
            names[ours] = theirs
    return names


def _check_and_limit(spec: DataSpec, splits: DatasetDict, where: str) -> None:
    from peftlab.config import check_limits

    check_limits(spec, {name: len(ds) for name, ds in splits.items()}, where)
    for name, limit in spec.limits.items():
        if name in splits and limit < len(splits[name]):
            splits[name] = splits[name].shuffle(seed=spec.seed).select(range(limit))


def _load_source(spec: DataSpec, base_dir: Path) -> tuple[dict[str, Dataset], str]:
    """Raw splits as the source names them, and a description of where they came from."""
    if spec.files:
        files = {split: _local(path, base_dir, f"data.files.{split}") for split, path in spec.files.items()}
        return {split: _read_file(path) for split, path in files.items()}, ", ".join(map(str, files.values()))
    if spec.source.startswith("asset:"):
        return _load_asset(spec.source.split(":", 1)[1])
    local = _local(spec.source, base_dir, None)
    if local is not None:
        if local.is_dir():
            found = {s: p for s in (*SPLITS, "dev") for p in _split_files(local, s)}
            if not found:
                raise InputError(
                    f"{local}: no train/validation/test .jsonl, .json, .csv or .conll files in this folder"
                )
            return {split: _read_file(path) for split, path in found.items()}, str(local)
        return {"train": _read_file(local)}, str(local)
    return _load_hub(spec), f"hub dataset {describe_source(spec)}"


def _local(path: str, base_dir: Path, key: str | None) -> Path | None:
    """A local path (relative to the experiment file's folder, then the working folder)."""
    for candidate in (base_dir / path, Path(path)):
        if candidate.expanduser().exists():
            return candidate.expanduser()
    if key is not None:
        raise InputError(f"{key}: no such file: {path} (relative paths are read from {base_dir})")
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix in FILE_TYPES
    if looks_local:
        raise InputError(f"data.source: no such file or folder: {path} (relative paths are read from {base_dir})")
    return None


def _split_files(folder: Path, split: str) -> list[Path]:
    return [p for ext in (".jsonl", ".json", ".csv", ".conll") if (p := folder / f"{split}{ext}").exists()][:1]


def _read_file(path: Path) -> Dataset:
    """A json/jsonl/csv file as a Dataset (via datasets' own readers)."""
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unsupported file type '{path.suffix}'; expected .json, .jsonl, .csv, .tsv or .conll")
    if path.suffix.lower() in (".jsonl", ".json"):
        from peftlab.data.squad import read_squad_json

        rows = read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_squad_json(path)
        if rows is not None:
            try:
                return Dataset.from_list(rows)
            except Exception as exc:  # pyarrow: one field with values of different types in different rows
                raise InputError(f"{path}: inconsistent field types: {str(exc).splitlines()[0][:300]}") from None
    if kind == "conll":
        from peftlab.data.conll import parse_conll

        rows = parse_conll(path.read_text(encoding="utf-8"), str(path), prefix=path.stem)
        if not rows:
            raise InputError(f"{path}: no sentences (expected token<TAB>tag lines, a blank line between sentences)")
        return Dataset.from_list(rows)
    try:
        from datasets import load_dataset

        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return load_dataset(kind, data_files=str(path), split="train", **extra)
    except Exception as exc:
        raise InputError(f"{path}: cannot read it as {kind}: {str(exc).splitlines()[0][:300]}") from None


def _load_asset(name: str) -> tuple[dict[str, Dataset], str]:
    from peftlab import assets

    folder = assets.locate(name)
    if assets.get(name).kind != "data":
        raise InputError(f"data.source: asset '{name}' is a model, not a dataset (see `peftlab assets list`)")
    splits = {
        s: Dataset.from_list(read_jsonl(folder / f"{s}.jsonl")) for s in SPLITS if (folder / f"{s}.jsonl").exists()
    }
    return splits, f"asset:{name}"


def _load_hub(spec: DataSpec) -> dict[str, Dataset]:
    from datasets import load_dataset

    try:
        loaded: Any = load_dataset(spec.source, spec.config_name)
    except Exception as exc:
        raise InputError(
            f"data.source: cannot load hub dataset '{describe_source(spec)}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). If the hub is unreachable here, use an offline asset "
            "(peftlab assets list) or local files."
        ) from None
    return dict(loaded)


def load_rows(spec: DataSpec, split: str | None, base_dir: Path | None = None) -> tuple[Dataset, str]:
    """One split of any source as raw rows (for eval/predict): the named split, else 'test', else the only one."""
    raw, where = _load_source(spec, base_dir or Path.cwd())
    if split is None:
        split = "test" if "test" in raw else (next(iter(raw)) if len(raw) == 1 else None)
        if split is None:
            raise InputError(f"{where}: several splits ({', '.join(raw)}); choose one with --split")
    if split not in raw:
        raise InputError(f"{where}: no split '{split}' (it has: {', '.join(raw)})")
    return raw[split], f"{where} [{split}]"
