"""Load an experiment's data into train/validation/test `datasets.Dataset`s of raw rows.

Sources: `asset:NAME` (normalised JSONL in the asset cache), a local file or folder (json, jsonl,
csv, CoNLL columns, or a SQuAD JSON document, see squad.py; a folder holds train/validation/test
files), explicit `files:` per split, or a hub dataset id (`datasets.load_dataset`). A source
without a validation split gets one carved (seeded) from train. Limits keep the first N rows of a
seeded shuffle, so a limit is a random sample that is the same on every machine. Tasks then map
the raw rows to their canonical fields.

`data.sources` merges several datasets: each is loaded as above, its fields renamed and its labels
mapped onto one label set, its rows tagged with `source` (its name) and given ids `NAME/ID`; the
merged splits keep the fields every source has. The experiment's limits then apply to the merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from peftlab.config import SPLITS, DataSpec, SourceSpec
from peftlab.errors import InputError
from peftlab.store import read_jsonl, read_text

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".conll": "conll"}


def load_splits(spec: DataSpec, base_dir: Path | None = None, needed: tuple[str, ...] = SPLITS) -> DatasetDict:
    """The experiment's splits as raw rows, with derived validation and limits applied."""
    if spec.sources:
        raw, where = _merge_sources(spec, base_dir or Path.cwd(), needed)
    else:
        raw, where = _named_splits(spec, base_dir or Path.cwd(), spec, needed)
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


def describe_source(spec: DataSpec | SourceSpec) -> str:
    if isinstance(spec, DataSpec) and spec.sources:
        return " + ".join(s.display_name for s in spec.sources)
    if not spec.source:
        return ", ".join(spec.files.values())
    return spec.source + (f" ({spec.config_name})" if spec.config_name else "")


def _named_splits(
    origin: DataSpec | SourceSpec, base_dir: Path, spec: DataSpec, needed: tuple[str, ...]
) -> tuple[dict[str, Dataset], str]:
    """One origin's splits under peftlab's split names, validation carved when needed."""
    raw, where = _load_source(origin, base_dir)
    renamed = {ours: raw[theirs] for ours, theirs in _split_names(origin, raw, where).items()}
    return _with_validation(renamed, spec, needed), where


def _with_validation(raw: dict[str, Dataset], spec: DataSpec, needed: tuple[str, ...]) -> dict[str, Dataset]:
    """Carve a seeded validation split from train when it is needed and the source has none."""
    if "validation" not in raw and "train" in raw and "validation" in needed:
        cut = raw["train"].train_test_split(test_size=spec.validation_fraction, seed=spec.seed, shuffle=True)
        raw = {**raw, "train": cut["train"], "validation": cut["test"]}
    return raw


# --- several sources -------------------------------------------------------------------------


def _merge_sources(spec: DataSpec, base_dir: Path, needed: tuple[str, ...]) -> tuple[dict[str, Dataset], str]:
    """Every source's splits, normalised (fields, labels, ids, `source`) and concatenated split by split."""
    merged: dict[str, list[dict[str, Any]]] = {}
    columns: set[str] | None = None
    for i, source in enumerate(spec.sources or []):
        key = f"data.sources.{i} ({source.display_name})"
        raw, where = _named_splits(source, base_dir, spec, needed)
        missing = [s for s in needed if s not in raw]
        if missing:
            raise InputError(f"{key}: {where} has no {', '.join(missing)} split (found: {', '.join(raw)})")
        for split in needed:
            rows = _source_rows(_limited(raw[split], source, split, spec.seed, key), source, f"{key} [{split}]")
            merged.setdefault(split, []).extend(rows)
            keys = set(rows[0]) if rows else set()
            columns = keys if columns is None else columns & keys
    kept = columns or {"id", "source"}
    out = {
        split: Dataset.from_list([{k: row.get(k) for k in row if k in kept} for row in rows])
        for split, rows in merged.items()
    }
    return out, describe_source(spec)


def sample(ds: Dataset, n: int, seed: int) -> Dataset:
    """The first n rows of a seeded shuffle (all rows when there are no more than n): limits, extra and
    forgetting sets, sweep fractions and analysis passes all draw the same rows for the same seed."""
    return ds if n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def _limited(ds: Dataset, source: SourceSpec, split: str, seed: int, key: str) -> Dataset:
    limit = source.limits.get(split)
    if limit is None:
        return ds
    if limit > len(ds):
        raise InputError(f"{key}: limits.{split}: {limit} is larger than the {len(ds)} examples of the {split} split")
    return ds.shuffle(seed=seed).select(range(limit))  # shuffled even at the full size: the order is part of it


def _source_rows(ds: Dataset, source: SourceSpec, where: str) -> list[dict[str, Any]]:
    """Rows with renamed fields, label names (not class ids), mapped labels, `NAME/ID` ids and `source`."""
    unknown = [f for f in source.fields if f not in ds.column_names]
    if unknown:
        raise InputError(
            f"{where}: fields: no field {', '.join(map(repr, unknown))} (fields: {', '.join(ds.column_names)})"
        )
    class_names = {col: feat.names for col, feat in ds.features.items() if hasattr(feat, "names")}
    name = source.display_name
    rows, unmapped = [], {}
    for index, row in enumerate(ds):
        out = {
            source.fields.get(col, col): class_names[col][v] if col in class_names and v is not None and v >= 0 else v
            for col, v in row.items()
        }
        label = out.get(source.label_field)
        label = None if label is None else str(label)
        if source.label_map is not None:
            if label not in source.label_map:
                unmapped[label] = unmapped.get(label, 0) + 1
                continue
            label = source.label_map[label]
            if label is None:  # mapped to null: dropped on purpose
                continue
        if source.label_field in out or source.label_map is not None:
            out[source.label_field] = label
        out["id"] = f"{name}/{out.get('id', index)}"
        out["source"] = name
        rows.append(out)
    if unmapped:
        shown = ", ".join(f"{k!r} ({v} examples)" for k, v in sorted(unmapped.items(), key=lambda kv: -kv[1])[:5])
        raise InputError(f"{where}: label_map has no entry for {shown}; map each label (null drops its examples)")
    return rows


def _split_names(spec: DataSpec | SourceSpec, raw: dict[str, Dataset], where: str) -> dict[str, str]:
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
        if name in splits:
            splits[name] = sample(splits[name], limit, spec.seed)


def _load_source(spec: DataSpec | SourceSpec, base_dir: Path) -> tuple[dict[str, Dataset], str]:
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

        rows = parse_conll(read_text(path), str(path), prefix=path.stem)
        if not rows:
            raise InputError(f"{path}: no sentences (expected token<TAB>tag lines, a blank line between sentences)")
        return Dataset.from_list(rows)
    try:
        from datasets import load_dataset

        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return load_dataset(kind, data_files=str(path), split="train", **extra)
    except Exception as exc:
        raise InputError(f"{path}: cannot read it as {kind}: {str(exc).splitlines()[0][:300]}") from None


def _load_asset(ref: str) -> tuple[dict[str, Dataset], str]:
    """An asset's splits (fetched on first use); `NAME:SUBSET` keeps the rows of that subset."""
    from peftlab import assets

    asset, values = assets.parse_ref(ref)
    if asset.kind != "data":
        raise InputError(f"data.source: asset '{asset.name}' is a model, not a dataset (see `peftlab assets list`)")
    folder = assets.ensure(asset.name)
    splits = {}
    for split in SPLITS:
        rows = read_jsonl(folder / f"{split}.jsonl")
        if values is not None:
            rows = [r for r in rows if r.get(asset.subset_field) in values]
        if rows:
            splits[split] = Dataset.from_list(rows)
    return splits, f"asset:{ref}"


def _load_hub(spec: DataSpec | SourceSpec) -> dict[str, Dataset]:
    from datasets import load_dataset

    from peftlab.models import offline_unless_hub_reachable

    offline_unless_hub_reachable()

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
