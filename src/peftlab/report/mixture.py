"""The report's section on each mixture of LoRA experts (`mixtures:`, method `xlora`).

Read as the X-LoRA comparison of the LoRA-multi study (../shared/reference/seed-lora-multi-xlora-bert.txt,
section 4.4) asks, with the baselines that make it honest beside it:
  - one score table: the learned gate, a uniform mix, each expert alone, PEFT's static merges and the
    gate without each expert, one column per task (its primary metric, x100);
  - per task: the learned gate's gain over the uniform mix and its share of the oracle (the task's own
    expert, which is the single LoRA run of that task), the gate's normalised entropy and the share of its
    weight on the task's own expert;
  - the gate's mean weights per adapted layer and expert for each task (heat maps, non-padding tokens);
  - the ablation: what removing one expert from the learned gate costs each task;
  - cost: prediction time and weight memory of the mixture against each single LoRA expert.
Built from runs/<experiment>/_mixtures/<name>/metrics.json only, like the rest of the report.
"""

from __future__ import annotations

from typing import Any

from peftlab.mixture.settings import FOLDER, LEARNED, UNIFORM
from peftlab.report import fmt_num, fmt_seconds
from peftlab.report.render import Block, Figure, Heading, Paragraph, Table, aligned_text
from peftlab.store import DONE, ExperimentDir, RunDir

BEST = "*"  # marks the best score of a column among the configurations


def mixture_folders(exp_dir: ExperimentDir) -> list[RunDir]:
    """The experiment's mixture folders (moved-aside ones excluded), in name order."""
    root = exp_dir.path / FOLDER
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and ".replaced-" not in p.name]


def mixture_blocks(exp_dir: ExperimentDir) -> list[Block]:
    """Every mixture's section; a mixture that failed or has not finished says so and why."""
    blocks: list[Block] = []
    for folder in mixture_folders(exp_dir):
        status = folder.status()
        if status.get("state") != DONE:
            why = status.get("error") or "it has not finished; run the experiment again to train it"
            blocks += [Heading(f"Mixture of LoRA experts `{folder.name}`"), Paragraph(f"Not scored: {why}.")]
            continue
        blocks += _one_mixture(exp_dir, folder.name, folder.metrics())
    return blocks


def _one_mixture(exp_dir: ExperimentDir, name: str, m: dict[str, Any]) -> list[Block]:
    view = MixtureView(m)
    blocks: list[Block] = [Heading(f"Mixture of LoRA experts `{name}`"), Paragraph(view.summary())]
    blocks += [view.score_table()]
    if m.get("failed"):
        failed = "; ".join(f"{k}: {v}" for k, v in m["failed"].items())
        blocks.append(Paragraph(f"Configurations that could not be scored: {failed}."))
    blocks.append(view.gain_table())
    figure = gate_heatmaps(exp_dir, name, view)
    blocks += [figure] if figure else []
    blocks += view.ablation_blocks()
    blocks.append(view.cost_table())
    files = f"{FOLDER}/{name}/"
    blocks.append(
        Paragraph(
            f"Every number is in `{files}metrics.json`; the learned gate's predictions in "
            f"`{files}predictions/`; gate, heads and the experts' hashes in `{files}adapter/` "
            "(`peftlab.mixture.run.load_mixture` rebuilds the mixture from it)."
        )
    )
    return blocks


class MixtureView:
    """One finished mixture's metrics.json, read for the report."""

    def __init__(self, metrics: dict[str, Any]) -> None:
        self.m = metrics
        self.experts: list[dict[str, Any]] = list(metrics.get("experts") or [])
        self.tasks = [e["name"] for e in self.experts]
        self.scores: dict[str, dict[str, Any]] = metrics.get("scores") or {}
        self.kinds: dict[str, str] = metrics.get("kinds") or {}

    def expert(self, task: str) -> dict[str, Any]:
        return next(e for e in self.experts if e["name"] == task)

    def score(self, configuration: str, task: str) -> float | None:
        """A configuration's primary score on a task, x100 (share of a perfect score), or None."""
        e = self.expert(task)
        value = (self.scores.get(configuration, {}).get(task) or {}).get(e["primary_metric"])
        if not isinstance(value, int | float):
            return None
        return 100.0 * value / float(e.get("score_scale") or 1.0)

    def _better(self, task: str) -> bool:
        return bool(self.expert(task).get("higher_is_better", True))

    def summary(self) -> str:
        s, p, t = self.m.get("settings") or {}, self.m.get("params") or {}, self.m.get("train") or {}
        gate = f"a {s.get('gate')} gate (depth {s.get('depth')}, width {s.get('gate_size')}"
        gate += f", softmax temperature {s.get('softmax_temperature')}"
        gate += f", top {s['top_k']} experts a token)" if s.get("top_k") else ")"
        examples = t.get("examples") or {}
        trained = "experts and gate" if s.get("train_experts") else "the gate only (experts frozen)"
        splits = ", ".join(f"{e['name']} {e.get('split')} ({e.get('examples')} examples)" for e in self.experts)
        return (
            f"{len(self.experts)} LoRA experts ({', '.join(self.tasks)}) mixed by {gate} over "
            f"{len(self.m.get('layers') or [])} adapted layers: {p.get('trainable', 0):,} trainable of "
            f"{p.get('total', 0):,} parameters (gate {p.get('gate', 0):,}; experts' LoRA weights "
            f"{p.get('experts', 0):,}; task heads {p.get('heads', 0):,}). Trained {trained} for "
            f"{t.get('epochs', '—')} epochs, {t.get('steps', '—')} steps on "
            + ", ".join(f"{k} {v:,}" for k, v in examples.items())
            + f" training examples ({fmt_seconds(t.get('train_seconds'))}, {self.m.get('precision', '—')}). "
            f"Scored on {splits}. A one-hot mix is exactly that expert, so `expert <task>` on its own task is "
            "the oracle: the single LoRA run of that task."
        )

    def score_table(self) -> Table:
        header = ["Configuration", "Kind", *[f"{t} {self.expert(t)['primary_metric']}" for t in self.tasks], "Mean"]
        best = {t: self._best(t) for t in self.tasks}
        rows, bold = [], set()
        for i, configuration in enumerate(self.scores):
            values = [self.score(configuration, t) for t in self.tasks]
            cells = [
                fmt_num(v) + (f" {BEST}" if v is not None and v == best[t] else "")
                for v, t in zip(values, self.tasks, strict=True)
            ]
            known = [v for v in values if v is not None]
            mean = sum(known) / len(known) if len(known) == len(values) and known else None
            rows.append([configuration, self.kinds.get(configuration, ""), *cells, fmt_num(mean)])
            if configuration == LEARNED:
                bold.add(i)
        return Table(
            header,
            rows,
            f"Each task's primary metric x100 on its scored split, for every configuration ({BEST} best in its "
            "column; mean over tasks). The learned gate in bold.",
            bold,
        )

    def _best(self, task: str) -> float | None:
        values = [v for c in self.scores if (v := self.score(c, task)) is not None]
        if not values:
            return None
        return max(values) if self._better(task) else min(values)

    def gain_table(self) -> Table:
        gate = self.m.get("gate") or {}
        rows = []
        for t in self.tasks:
            learned, uniform, oracle = self.score(LEARNED, t), self.score(UNIFORM, t), self.score(f"expert {t}", t)
            others = [(v, o) for o in self.tasks if o != t and (v := self.score(f"expert {o}", t)) is not None]
            pick = max if self._better(t) else min
            other = pick(others) if others else None
            g = gate.get(t) or {}
            rows.append(
                [
                    t,
                    fmt_num(learned),
                    fmt_num(uniform),
                    _signed(_diff(learned, uniform)),
                    fmt_num(oracle),
                    f"{fmt_num(other[0])} ({other[1]})" if other else "—",
                    _share(learned, oracle),
                    fmt_num(g.get("mean_entropy"), 3),
                    fmt_num(g.get("own_share"), 3),
                ]
            )
        header = ["Task", "Learned gate", "Uniform mix", "Gain over uniform", "Oracle (own expert)"]
        header += ["Best other expert", "Share of oracle %", "Gate entropy", "Weight on own expert"]
        return Table(
            header,
            rows,
            "Per task (x100): the learned gate against the uniform mix and against the task's own expert; the "
            "gate's mean normalised entropy (1 = uniform over experts, 0 = one expert) and mean weight on the "
            "task's own expert, over adapted layers and non-padding tokens.",
        )

    def ablation_blocks(self) -> list[Block]:
        removed = [t for t in self.tasks if f"without {t}" in self.scores]
        if not removed:
            return []
        rows = []
        for r in removed:
            changes = [_signed(_diff(self.score(f"without {r}", t), self.score(LEARNED, t))) for t in self.tasks]
            rows.append([r, *changes])
        caption = (
            "Ablation: the change in each task's score (x100) when the learned gate may not use one expert "
            "(its weight masked, the rest renormalised); a large drop on a task means the gate relies on "
            "that expert there."
        )
        return [Table(["Expert removed", *self.tasks], rows, caption)]

    def cost_table(self) -> Table:
        inference = self.m.get("inference") or {}
        params = self.m.get("params") or {}
        rows = []
        for t in self.tasks:
            i = inference.get(t) or {}
            mixture_s, expert_s = i.get("mixture_seconds"), i.get("expert_seconds")
            ratio = mixture_s / expert_s if isinstance(mixture_s, int | float) and expert_s else None
            rows.append(
                [
                    t,
                    str(i.get("examples", "—")),
                    fmt_seconds(mixture_s),
                    fmt_seconds(expert_s),
                    fmt_num(ratio, 2),
                    _count(params.get("total")),
                    _count(i.get("single_expert_total")),
                    _mib(params.get("weight_bytes")),
                    _mib(i.get("single_expert_bytes")),
                ]
            )
        header = ["Task", "Examples", "Mixture time", "Single LoRA time", "Time ratio"]
        header += ["Mixture params", "Single LoRA params", "Mixture weights MiB", "Single LoRA weights MiB"]
        return Table(
            header,
            rows,
            "Cost of prediction: the mixture (all experts, the gate and every task's head in one model) against "
            "the task's expert reloaded as a single LoRA model, on the same examples and machine; weight memory "
            "measured from the tensors (parameters and buffers).",
        )


def gate_heatmaps(exp_dir: ExperimentDir, name: str, view: MixtureView) -> Figure | None:
    """One heat map per task: the learned gate's mean weight per adapted layer (rows) and expert."""
    import matplotlib.pyplot as plt
    import numpy as np

    gate = view.m.get("gate") or {}
    tasks = [t for t in view.tasks if (gate.get(t) or {}).get("weights")]
    if not tasks:
        return None
    layers = len(gate[tasks[0]]["weights"])
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(1.2 + 2.2 * len(tasks), 1.4 + 0.16 * layers), dpi=110, squeeze=False
    )
    image = None
    for ax, task in zip(axes[0], tasks, strict=True):
        weights = np.asarray(gate[task]["weights"], dtype=float)
        image = ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(view.tasks)), view.tasks, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{task} (own {gate[task].get('own_share', 0):.2f})", fontsize=8)
        names = view.m.get("layers") or []
        if len(names) == layers and task == tasks[0]:
            ax.set_yticks(range(layers), [_short(n) for n in names], fontsize=6)
        ax.set_ylabel("adapted layer" if task == tasks[0] else "")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), fraction=0.02, pad=0.02, label="mean gate weight")
    path = exp_dir.path / "figures" / f"mixture-{name}-gate.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # not plots._save: tight_layout fights a shared colour bar
    plt.close(fig)
    caption = (
        f"Mixture `{name}`: the learned gate's mean weight per adapted layer (rows, input side first) and expert "
        "(columns) on each task's scored examples, non-padding tokens only; in brackets the mean weight on the "
        "task's own expert."
    )
    return Figure(path.relative_to(exp_dir.path), caption)


def mixture_terminal_lines(exp_dir: ExperimentDir) -> list[str]:
    """Each finished mixture's score table as aligned text (for the end-of-run summary)."""
    out = []
    for folder in mixture_folders(exp_dir):
        if folder.status().get("state") != DONE:
            continue
        table = MixtureView(folder.metrics()).score_table()
        out += ["", f"mixture {folder.name} (x100):", aligned_text(table.header, table.rows, left=2)]
    return out


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _signed(value: float | None) -> str:
    return f"{value:+.1f}" if value is not None else "—"


def _share(value: float | None, oracle: float | None) -> str:
    return fmt_num(100.0 * value / oracle) if value is not None and oracle else "—"


def _mib(value: Any) -> str:
    return fmt_num(value / 2**20) if isinstance(value, int | float) else "—"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "—"


def _short(module: str) -> str:
    """A LoRA module's name as its block number and own name: `...layer.3.attention.self.query` -> `3 query`."""
    parts = module.split(".")
    numbers = [p for p in parts if p.isdigit()]
    return f"{numbers[-1]} {parts[-1]}" if numbers else parts[-1]
