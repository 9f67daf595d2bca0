"""The "Inside the model" section: what training did to the weights, the hidden states and the attention.

Built from the files the analysis wrote into each run (`<run>/analysis/analysis.json`, `subspaces.npz`).
Nothing about a model is recomputed here; the one measure computed is the cross-run subspace similarity
(Hu et al. 2021 §7.2), which needs two runs' files at once and so cannot be written by either run.
A run without analysis is listed as such and a damaged file is said, never fatal: the rest of the report
must still come out.
"""

from __future__ import annotations

import itertools
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftlab.analysis.run import BASES, FOLDER, RESULT, mean_of
from peftlab.analysis.subspace import similarity_grid
from peftlab.config import SPLITS
from peftlab.errors import InputError
from peftlab.report import fmt_int, fmt_metric, fmt_num, fmt_seconds, plots
from peftlab.report.render import Block, Figure, Figures, Heading, Paragraph, Table
from peftlab.report.sweeps import _log_x, _single_numeric_axis, groups_of
from peftlab.store import DONE, ExperimentDir, RunDir, read_json

QUERY_TYPES = ("query", "q_proj", "q_lin", "q", "c_attn")  # the matrix Hu et al. look at first
ROWS, COLUMNS = 8, 64  # the φ grid: i ≤ 8 directions of the smaller adapter, j ≤ 64 of the larger (their Fig. 3)
DAMAGED = (zipfile.BadZipFile, zlib.error, ValueError, OSError, KeyError, EOFError)
Measure = Callable[["Analysed"], float | None]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value == value else None


@dataclass
class Analysed:
    """One finished run with a readable analysis.json, and what the tables need from its metrics."""

    run: RunDir
    data: dict[str, Any]
    score: float | None
    trainable_pct: float | None

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def method(self) -> str:
        return str(self.data.get("method") or self.run.config().get("method", ""))

    def part(self, name: str) -> dict[str, Any]:
        """A measured part; {} when absent or failed (the failure is in errors())."""
        found = _dict(self.data.get(name))
        return {} if "error" in found else found

    def summary(self) -> dict[str, Any]:
        return _dict(self.part("weights").get("summary"))

    def split(self, part: str, split: str) -> dict[str, Any]:
        return _dict(_dict(self.part(part).get("splits")).get(split))

    def matrices(self) -> list[dict[str, Any]]:
        return [m for m in _list(self.part("weights").get("matrices")) if isinstance(m, dict)]

    def rank(self) -> int | None:
        limits = [m["rank_limit"] for m in self.matrices() if isinstance(m.get("rank_limit"), int)]
        return max(limits) if limits else None

    def errors(self) -> dict[str, str]:
        found = {str(k): str(v) for k, v in _dict(self.data.get("errors")).items()}
        for part in ("weights", "drift", "attention"):
            if "error" in _dict(self.data.get(part)):
                found.setdefault(part, str(self.data[part]["error"]))
        return found


def inside_blocks(
    exp_dir: ExperimentDir, runs: list[RunDir], primary: str | None, split: str, tag: str = ""
) -> list[Block]:
    """The section for one task's runs; [] when none of them has an analysis.

    `primary`: the metric of the score column (None: each run's own task.primary_metric); `split`: the
    in-domain split it is read on and the one preferred for the drift and attention means; `tag` names
    the (model, task) group in the heading and figure files of a multi-task report.
    """
    metric = primary or next((m for r in runs if (m := _dict(r.metrics().get("task")).get("primary_metric"))), None)
    analysed, missing, unreadable = load(runs, metric, split)
    if not analysed and not unreadable:
        return []
    blocks: list[Block] = [Heading("Inside the model" + (f" ({tag})" if tag else "")), *map(Paragraph, INTRO)]
    if missing:
        blocks.append(Paragraph("Not analysed: " + ", ".join(missing) + "."))
    if unreadable:
        blocks.append(Paragraph("Analysis unreadable (left out): " + "; ".join(unreadable) + "."))
    if not analysed:
        return blocks
    drift = _pick(analysed, "drift", split)
    attention = _pick(analysed, "attention", split)
    measures = _measures(drift, attention)
    blocks.append(summary_table(analysed, metric or "score", split, measures, drift, attention))
    blocks += [Paragraph(f"{a.name}: {part} failed ({e})") for a in analysed for part, e in a.errors().items()]
    blocks += rank_sweep_blocks(exp_dir, analysed, measures, tag)
    drawn = [drift_figure(exp_dir, analysed, tag), attention_figure(exp_dir, analysed, attention, tag)]
    drawn += [spectra_figure(exp_dir, analysed, tag), intruder_figure(exp_dir, analysed, tag)]
    figures = [f for f in drawn if f is not None]
    blocks += [Figures(figures)] if figures else []
    blocks += subspace_blocks(exp_dir, analysed, tag)
    return [*blocks, Paragraph(CAVEAT)]


INTRO = (
    "What training changed inside the model, each run against its base model on the same examples:",
    "- ‖ΔW‖/‖W0‖, effective rank (Roy & Vetterli 2007: exp of the entropy of ΔW's normalised singular values) "
    "and k90 (the fewest singular directions holding 90% of ‖ΔW‖²), per adapted matrix;",
    "- intruder dimensions (Shuttleworth et al. 2024): among the tuned matrix's top 10 singular vectors, those "
    "with cosine < ε = 0.5 to every singular vector of W0, and the share of energy they carry;",
    "- linear CKA (Kornblith et al. 2019, debiased) of each layer's hidden states, base vs tuned (1 = unchanged);",
    "- attention change: Jensen-Shannon divergence of base vs tuned attention rows per layer and head "
    "(0 = unchanged, at most ln 2).",
    "Every number is in `<run>/analysis/analysis.json` (per matrix, layer and head); the singular directions "
    "compared across runs in `<run>/analysis/subspaces.npz`.",
)
CAVEAT = (
    "Reading the intruder counts: in high dimension a delocalised direction has a small cosine to every "
    "singular vector of W0, so at ε near 1 almost any changed direction counts as an intruder. Read a count "
    "with its energy share (a few intruders carrying little energy change little), and across runs at the "
    "same ε."
)


# --- collecting ------------------------------------------------------------------------------


def load(runs: list[RunDir], primary: str | None, split: str) -> tuple[list[Analysed], list[str], list[str]]:
    """(finished runs with an analysis, names of those without, 'name (why)' of damaged ones)."""
    analysed, missing, unreadable = [], [], []
    for run in runs:
        if run.status().get("state") != DONE:
            continue
        path = run.path / FOLDER / RESULT
        if not path.exists():
            missing.append(run.name)
            continue
        try:
            data = read_json(path)
        except (InputError, OSError) as exc:
            unreadable.append(f"{run.name} ({str(exc).replace(str(run.path) + '/', '')})")
            continue
        if not isinstance(data, dict):
            unreadable.append(f"{run.name} (not a JSON object)")
            continue
        metrics = run.metrics()
        score = _num(_dict(_dict(metrics.get("eval")).get(split)).get(primary))
        analysed.append(Analysed(run, data, score, _num(_dict(metrics.get("params")).get("trainable_pct"))))
    return analysed, missing, unreadable


def _splits(analysed: list[Analysed], part: str) -> list[str]:
    """The splits a part measured in any run: the in-domain ones first (train, validation, test), then the rest."""
    found = list(dict.fromkeys(s for a in analysed for s in _dict(a.part(part).get("splits"))))
    return sorted(found, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), found.index(s)))


def _pick(analysed: list[Analysed], part: str, split: str) -> str | None:
    """The split a part's mean is shown for: the report's in-domain split, else test, else the first."""
    found = _splits(analysed, part)
    return next((s for s in (split, "test") if s in found), found[0] if found else None)


def _measures(drift: str | None, attention: str | None) -> dict[str, Measure]:
    """The per-run numbers the tables and the sweep figure share."""

    def weights(key: str) -> Measure:
        return lambda a: _num(a.summary().get(key))

    return {
        "effective rank": weights("effective_rank"),
        "k90": weights("k90"),
        "intruders": weights("intruders"),
        "mean CKA": lambda a: mean_of(a.split("drift", drift or "").get("cka")),
        "mean JS": lambda a: mean_of(a.split("attention", attention or "").get("js")),
    }


# --- tables ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def cells(a: Analysed, m: dict[str, Measure]) -> dict[str, str]:
    """One run's formatted numbers, by column name (both tables pick theirs)."""
    s, change = a.summary(), _num(a.summary().get("relative_change"))
    return {
        "Trainable %": fmt_num(a.trainable_pct, 3),
        "Score": fmt_metric(a.score),
        "Matrices": fmt_int(_num(s.get("matrices"))),
        "‖ΔW‖/‖W0‖": "—" if change is None else f"{change:.3g}",
        "Effective rank": _fmt(m["effective rank"](a)),
        "k90": _fmt(m["k90"](a), 1),
        "Intruders": fmt_int(m["intruders"](a)),
        "Intruders / matrix": _fmt(_num(s.get("intruders_per_matrix"))),
        "Intruder energy": _fmt(_num(s.get("intruder_energy")), 3),
        "Mean CKA": fmt_metric(m["mean CKA"](a)),
        "Mean JS": fmt_metric(m["mean JS"](a)),
        "Analysis time": fmt_seconds(_num(_dict(a.data.get("seconds")).get("total"))),
    }


def summary_table(
    analysed: list[Analysed], metric: str, split: str, m: dict[str, Measure], drift: str | None, attn: str | None
) -> Table:
    names = {"Score": f"{split} {metric}", "Mean CKA": f"CKA ({drift or '—'})", "Mean JS": f"JS ({attn or '—'})"}
    keys = list(cells(analysed[0], m))
    rows = [[a.name, a.method, *cells(a, m).values()] for a in analysed]
    caption = (
        "Weight measures are means over the adapted matrices (intruders: the total at ε = 0.5, and per matrix); "
        "CKA and JS are means over layers (and heads) on the split named; the last column is the analysis's time."
    )
    return Table(["Run", "Method", *(names.get(k, k) for k in keys)], rows, caption)


SWEPT = ("Score", "Effective rank", "k90", "Intruders", "Mean CKA", "Mean JS")


def rank_sweep_blocks(exp_dir: ExperimentDir, analysed: list[Analysed], m: dict[str, Measure], tag: str) -> list[Block]:
    """When the analysed runs sweep one numeric setting (e.g. lora.r): the measures against it, full FT last."""
    by_name = {a.name: a for a in analysed}
    groups = groups_of([a.run for a in analysed])
    swept = [g for g in groups if g.point]
    axis = _single_numeric_axis([g.point for g in swept]) if len(swept) > 1 else None
    if axis is None:
        return []
    points = sorted(((g.point[axis], by_name[r.name]) for g in swept for r in g.runs), key=lambda p: (p[0], p[1].name))
    full = [by_name[r.name] for g in groups if not g.point for r in g.runs if by_name[r.name].method == "full"]
    name = axis.split(".")[-1]
    rows = [[f"{x:g}", a.name, *(cells(a, m)[k] for k in SWEPT)] for x, a in points]
    rows += [["full FT", a.name, *(cells(a, m)[k] for k in SWEPT)] for a in full]
    table = Table(
        [name, "Run", *SWEPT], rows, f"The measures for each {name} (one row per run); full fine-tuning last."
    )
    return [Heading(f"Inside the model against {name}", 3), table, _sweep_figure(exp_dir, points, full, name, m, tag)]


# --- figures ---------------------------------------------------------------------------------


def _grid(panels: int, width: float = 4.0, height: float = 3.2, columns: int = 4) -> tuple[Any, list[Any]]:
    """A figure of small panels, at most `columns` a row; the unused ones hidden."""
    import matplotlib.pyplot as plt

    cols = min(panels, columns)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=110, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _save(exp_dir: ExperimentDir, fig: Any, stem: str, tag: str, caption: str) -> Figure:
    path = plots._save(fig, exp_dir.path / "figures" / f"{stem}{f'-{tag}' if tag else ''}.png")
    return Figure(path.relative_to(exp_dir.path), caption)


def _sweep_figure(
    exp_dir: ExperimentDir, points: list[tuple[float, Analysed]], full: list[Analysed], name: str, m: dict, tag: str
) -> Figure:
    panels = [("effective rank & k90", ["effective rank", "k90"]), ("intruders (ε = 0.5)", ["intruders"])]
    panels += [(key, [key]) for key in ("mean CKA", "mean JS") if any(m[key](a) is not None for _, a in points)]
    fig, axes = _grid(len(panels), 3.6, 3.0)
    xs = sorted({x for x, _ in points})
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for i, key in enumerate(keys):
            found = [(x, v) for x, a in points if (v := m[key](a)) is not None]
            means = [(x, mean_of([v for px, v in found if px == x])) for x in xs]
            shown = [(x, v) for x, v in means if v is not None]
            if shown:
                ax.plot(*zip(*shown, strict=True), "o-", color=f"C{i}", label=key)
            ax.plot([x for x, _ in found], [v for _, v in found], ".", color=f"C{i}", alpha=0.4)
            reference = mean_of([m[key](a) for a in full])
            if reference is not None:
                ax.axhline(reference, color=f"C{i}", ls="--", lw=1, label=f"{key}: full FT")
        _log_x(ax, xs)
        ax.set(xlabel=name, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(exp_dir, fig, f"inside-{name}", tag, f"Inside the model against {name} (dashed: full fine-tuning)")


def drift_figure(exp_dir: ExperimentDir, analysed: list[Analysed], tag: str) -> Figure | None:
    """CKA per layer, one line per run; a panel per split (in domain, then out of domain), at most four."""
    splits = _splits(analysed, "drift")[:4]
    if not splits:
        return None
    fig, axes = _grid(len(splits), 4.4, 3.2)
    for ax, split in zip(axes, splits, strict=True):
        labels: list[str] = []
        for a in analysed:
            values = [_num(v) for v in _list(a.split("drift", split).get("cka"))]
            if any(v is not None for v in values):
                ax.plot(range(len(values)), [np.nan if v is None else v for v in values], "o-", ms=3, label=a.name)
                labels = max(labels, [str(n) for n in _list(a.split("drift", split).get("layers"))], key=len)
        ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 8 else 0, fontsize=7)
        where = "in domain" if split in SPLITS else "out of domain"
        ax.set(ylim=(0, 1.02), xlabel="layer", ylabel="linear CKA, base vs tuned", title=f"{split} ({where})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(exp_dir, fig, "inside-drift", tag, "Hidden-state drift: CKA per layer (1 = unchanged)")


def _matrix(values: Any) -> np.ndarray | None:
    try:
        grid = np.asarray(values, dtype=float)
    except (ValueError, TypeError):
        return None
    return grid if grid.ndim == 2 and grid.size else None


def _heatmap(ax: Any, grid: np.ndarray, cmap: str, top: float, first: int) -> Any:
    """A grid drawn with its rows and columns numbered from `first` (layers and heads from 0, φ's i, j from 1)."""
    from matplotlib.ticker import MaxNLocator

    rows, cols = grid.shape
    extent = (first - 0.5, first + cols - 0.5, first + rows - 0.5, first - 0.5)
    image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=top, aspect="auto", extent=extent)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return image


def attention_figure(exp_dir: ExperimentDir, analysed: list[Analysed], split: str | None, tag: str) -> Figure | None:
    """JS divergence per layer × head, one panel per run, one colour scale for all."""
    grids = [(a.name, g) for a in analysed if (g := _matrix(a.split("attention", split or "").get("js"))) is not None]
    if not grids:
        return None
    top = max(float(np.nan_to_num(g).max()) for _, g in grids)
    fig, axes = _grid(len(grids), 3.4, 2.8)
    for ax, (name, grid) in zip(axes, grids, strict=True):
        image = _heatmap(ax, grid, "magma", top if top > 0 else 1.0, first=0)
        ax.set(xlabel="head", ylabel="layer", title=name)
    fig.colorbar(image, ax=axes[-1], fraction=0.05)
    return _save(exp_dir, fig, "inside-attention", tag, f"Attention change: JS divergence base vs tuned ({split})")


def chosen_type(analysed: list[Analysed]) -> str | None:
    """The matrix type most runs have a spectrum of; among equals a query matrix (Hu et al.'s W_q)."""
    counts: dict[str, int] = {}
    for a in analysed:
        for kind in _dict(a.part("weights").get("spectra")):
            counts[kind] = counts.get(kind, 0) + 1
    return max(counts, key=lambda k: (counts[k], k in QUERY_TYPES)) if counts else None


def spectra_figure(exp_dir: ExperimentDir, analysed: list[Analysed], tag: str) -> Figure | None:
    """ΔW's singular values (mean over layers) of one matrix type, raw on a log scale: how fast they fall."""
    kind = chosen_type(analysed)
    found = [(a.name, _dict(a.part("weights").get("spectra")).get(kind)) for a in analysed]
    series = [(n, [v for v in map(_num, s) if v is not None and v > 0]) for n, s in found if isinstance(s, list)]
    series = [(n, list(range(1, len(v) + 1)), v) for n, v in series]
    settings = {"yscale": "log", "xlabel": "i", "ylabel": "σ_i of ΔW (mean over layers)", "title": f"ΔW: {kind}"}
    caption = f"Singular values of ΔW for `{kind}` matrices, per run"
    return _lines(exp_dir, series, "inside-spectra", tag, caption, settings)


def intruder_figure(exp_dir: ExperimentDir, analysed: list[Analysed], tag: str) -> Figure | None:
    """Total intruders against ε: shows how much of a count is the threshold's doing."""
    series = []
    for a in analysed:
        found = [(_epsilon(k), _num(v)) for k, v in _dict(a.summary().get("intruders_by_epsilon")).items()]
        points = sorted((e, c) for e, c in found if e is not None and c is not None)
        series.append((a.name, [e for e, _ in points], [c for _, c in points]))
    settings = {"xlabel": "ε (cosine threshold)", "ylabel": "intruders (all matrices)", "title": "Intruders against ε"}
    caption = "Intruders against ε (dotted: ε = 0.5, the table's); near 1 almost any direction counts"
    return _lines(exp_dir, series, "inside-intruders", tag, caption, settings, mark=0.5)


def _epsilon(key: str) -> float | None:
    """ε from its JSON key ("0.5")."""
    try:
        return float(key)
    except ValueError:
        return None


def _lines(
    exp_dir: ExperimentDir, series: list, stem: str, tag: str, caption: str, settings: dict, mark: float | None = None
) -> Figure | None:
    """One panel, a line per (name, xs, ys) series with points; None when no series has any."""
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, (ax,) = _grid(1, 5.2, 3.6)
    for name, xs, ys in series:
        ax.plot(xs, ys, "o-", ms=3, label=name)
    if mark is not None:
        ax.axvline(mark, color="gray", ls=":", lw=1)
    ax.set(**settings)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(exp_dir, fig, stem, tag, caption)


# --- subspace similarity across runs (Hu et al. 2021 §7.2, Fig. 3) --------------------------


def subspace_similarity(u1: np.ndarray, u2: np.ndarray, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """φ on the report's grid (Hu et al. Fig. 3: i ≤ 8 directions of one adapter, j ≤ 64 of the other)."""
    return similarity_grid(u1, u2, rows, columns)


def read_bases(run: RunDir) -> dict[str, np.ndarray] | None:
    """A run's subspaces.npz, read whole; None when missing or damaged (no comparison for that run)."""
    path = run.path / FOLDER / BASES
    try:
        with np.load(path, allow_pickle=False) as found:
            return {name: np.asarray(found[name]) for name in found.files}
    except DAMAGED:
        return None


def pair_similarity(pair: tuple[Analysed, Analysed], bases: dict[str, dict], kind: str) -> np.ndarray | None:
    """φ averaged over the matrices of type `kind` both runs have (one per layer)."""
    first, second = pair
    names = [m.get("name") for m in first.matrices() if m.get("type") == kind]
    names = [n for n in names if n in bases[first.name] and n in bases[second.name]]
    grids = []
    for name in names:
        try:
            grids.append(subspace_similarity(bases[first.name][name], bases[second.name][name]))
        except ValueError:
            continue
    if not grids:
        return None
    rows, cols = min(g.shape[0] for g in grids), min(g.shape[1] for g in grids)
    return np.mean([g[:rows, :cols] for g in grids], axis=0)


def pairs(lora: list[Analysed]) -> list[tuple[Analysed, Analysed]]:
    """(lowest rank, highest rank), and two runs of one rank (seeds) when there are."""
    ranked = sorted((a for a in lora if a.rank() is not None), key=lambda a: (a.rank(), a.name))
    high = next((a for a in ranked if a.rank() == ranked[-1].rank()), None)  # the first of the highest rank
    out = [(ranked[0], high)] if high and ranked[0].rank() != high.rank() else []
    same = next(((a, b) for a, b in itertools.pairwise(ranked) if a.rank() == b.rank()), None)
    return out + ([same] if same else [])


def subspace_blocks(exp_dir: ExperimentDir, analysed: list[Analysed], tag: str) -> list[Block]:
    lora = [a for a in analysed if a.method == "lora"]
    bases = {a.name: read_bases(a.run) for a in lora}
    blocks: list[Block] = []
    damaged = [a.name for a in lora if bases[a.name] is None and (a.run.path / FOLDER / BASES).exists()]
    if damaged:
        blocks.append(Paragraph(f"subspaces.npz unreadable for {', '.join(damaged)}: no cross-run comparison."))
    kind = chosen_type(analysed)
    found = [
        (p, g)
        for p in pairs([a for a in lora if bases[a.name]])
        if kind and (g := pair_similarity(p, bases, kind)) is not None
    ]
    if not found:
        return blocks
    header = ["Runs (i: first, j: second)", "Ranks", "φ(1, 1)", "mean φ over the grid"]
    rows = [
        [f"{a.name} / {b.name}", f"{a.rank()} / {b.rank()}", f"{g[0, 0]:.3f}", f"{g.mean():.3f}"] for (a, b), g in found
    ]
    fig, axes = _grid(len(found), 5.0, 2.4, columns=2)
    for ax, ((a, b), grid) in zip(axes, found, strict=True):
        image = _heatmap(ax, grid, "viridis", 1.0, first=1)
        ax.set(xlabel=f"j ({b.name})", ylabel=f"i ({a.name})", title=f"φ: {a.name} vs {b.name}")
    fig.colorbar(image, ax=axes[-1], fraction=0.05)
    caption = f"Subspace similarity φ(i, j) of the LoRA A matrices' top directions, `{kind}`, mean over layers"
    table = Table(header, rows, caption + " (Hu et al. 2021 §7.2: 1 = the smaller subspace lies in the other).")
    return [
        *blocks,
        Heading("Subspace similarity across runs", 3),
        table,
        _save(exp_dir, fig, "inside-subspaces", tag, caption),
    ]
