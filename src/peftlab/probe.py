"""`peftlab probe RUN_DIR... --examples FILE`: the same hand-written examples through several runs.

The error analysis of a PEFT paper (e.g. the LoRA-vs-(IA)3 study's section IV.D) looks at what
each model answers on a few designed examples. An examples file (YAML: a list, or a mapping with
`examples:`; or JSON lines) holds one example per item: the task's input fields (`context` and
`question` for QA, `text` for classification), and optionally `id`, `category` and `expected` (a
string or a list of acceptable answers). Every run predicts every example through its own task
(nothing here is task-specific: the task says what an example shows, how a prediction reads and
what counts as a match); the result is a side-by-side table in the terminal and in `probe.md`
(plus `probe.jsonl`), with a match mark where an expected answer is given.

Where it is written: `--output PATH` (a .md file), else `probe.md` in the experiment folder of the
first run (runs/<experiment>/probe.md); `probe.jsonl` goes beside it.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from peftlab.config import MAX_CONFIG_BYTES, parse_yaml
from peftlab.errors import InputError
from peftlab.report.render import Heading, Paragraph, Table, to_markdown
from peftlab.store import RunDir, read_jsonl, read_text, write_atomic, write_jsonl
from peftlab.trained import load_run

MATCH, MISS = "✓", "✗"
PROBE_KEYS = ("expected", "category")  # the probe's own fields; the rest goes to the task


@dataclass
class ProbeExample:
    id: str
    category: str
    expected: Any  # None, a string, or a list of acceptable answers
    fields: dict[str, Any]  # what the task reads (context, question, text, ...)


@dataclass
class ProbeResult:
    examples: list[ProbeExample]
    inputs: list[str]  # what each example shows in the table (the question, the text)
    runs: list[str]  # column labels
    answers: dict[str, list[str]]  # run label -> shown answer per example
    matches: dict[str, list[bool | None]]  # run label -> match per example (None: nothing expected)
    output: Path


def read_examples(path: Path) -> list[ProbeExample]:
    """Probe examples from YAML (a list, or {examples: [...]}) or JSON lines; InputError naming the item."""
    if not path.is_file():
        raise InputError(f"--examples {path}: no such file")
    if path.suffix.lower() == ".jsonl":
        items: Any = read_jsonl(path)
    else:
        items = parse_yaml(read_text(path, max_bytes=MAX_CONFIG_BYTES), str(path))
        items = items.get("examples") if isinstance(items, dict) else items
    if not isinstance(items, list) or not items:
        raise InputError(f"{path}: expected a non-empty list of examples (or a mapping with `examples:`)")
    examples = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise InputError(f"{path}: example {i}: expected a mapping of fields, got {type(item).__name__}")
        fields = {k: v for k, v in item.items() if k not in PROBE_KEYS}
        fields["id"] = str(item.get("id", i))
        expected = item.get("expected")
        if isinstance(expected, int | float) and not isinstance(expected, bool):
            expected = str(expected)  # YAML reads `expected: 1866` as a number
        if isinstance(expected, list):
            expected = [str(e) for e in expected]
        elif expected is not None and not isinstance(expected, str):
            raise InputError(f"{path}: example {fields['id']}: expected must be a string or a list of strings")
        examples.append(ProbeExample(fields["id"], str(item.get("category") or ""), expected, fields))
    return examples


def probe_runs(run_dirs: list[Path], examples_file: Path, output: Path | None = None) -> ProbeResult:
    """Predict every example with every run; write probe.md and probe.jsonl; return the table's content."""
    if not run_dirs:
        raise InputError("probe: name at least one run folder")
    examples = read_examples(examples_file)
    rows = Dataset.from_list([ex.fields for ex in examples])
    labels = run_labels([RunDir(Path(path)) for path in run_dirs])
    answers: dict[str, list[str]] = {}
    matches: dict[str, list[bool | None]] = {}
    inputs: list[str] = []
    described: list[list[str]] = []  # label, folder, method, model: for probe.md
    task_names: list[str] = []
    out = output
    for label, path in zip(labels, run_dirs, strict=True):
        run = load_run(path)  # one model in memory at a time: probes may compare several large runs
        task_names.append(run.config["task"]["name"])
        if len(set(task_names)) > 1:
            raise InputError(
                f"probe: the runs solve different tasks ({', '.join(sorted(set(task_names)))}); "
                "probe one task at a time"
            )
        described.append([label, str(run.folder.path), run.config.get("method", ""), run.source.describe()])
        out = out or run.folder.path.parent / "probe.md"
        canonical = run.task.examples_from_rows(rows, str(examples_file), labelled=False)
        predictions = run.predict(canonical)
        inputs = [run.task.probe_input(ex) for ex in canonical]
        answers[label] = [run.task.probe_answer(p) for p in predictions]
        matches[label] = [
            None if ex.expected is None else run.task.probe_match(p, ex.expected)
            for ex, p in zip(examples, predictions, strict=True)
        ]
        del run
    assert out is not None
    result = ProbeResult(examples, inputs, labels, answers, matches, out)
    write_probe(result, described, examples_file)
    return result


def run_labels(folders: list[RunDir]) -> list[str]:
    """Run folder names, or experiment/run where runs of several experiments share a name."""
    names = [folder.name for folder in folders]
    if len(set(names)) == len(names):
        return names
    return [f"{folder.path.parent.name}/{folder.name}" for folder in folders]


# --- output ------------------------------------------------------------------------------------


def _cell(result: ProbeResult, label: str, i: int) -> str:
    mark = {True: f" {MATCH}", False: f" {MISS}", None: ""}[result.matches[label][i]]
    return result.answers[label][i] + mark


def _expected_text(expected: Any) -> str:
    if expected is None:
        return "—"
    return expected if isinstance(expected, str) else " | ".join(map(str, expected))


def table_rows(result: ProbeResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table, with a final row counting matches per run."""
    header = ["#", "category", "input", "expected", *result.runs]
    rows = [
        [ex.id, ex.category or "—", result.inputs[i], _expected_text(ex.expected)]
        + [_cell(result, label, i) for label in result.runs]
        for i, ex in enumerate(result.examples)
    ]
    scored = sum(ex.expected is not None for ex in result.examples)
    if scored:
        rows.append(
            ["", "", "matches", f"{scored} expected"]
            + [f"{sum(m is True for m in result.matches[label])}/{scored}" for label in result.runs]
        )
    return header, rows


def text_table(header: list[str], rows: list[list[str]], width: int) -> str:
    """An aligned table with cells wrapped to fit `width` characters."""
    natural = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    widths = list(natural)
    budget = width - 3 * (len(widths) - 1)
    while sum(widths) > budget and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [textwrap.wrap(str(c), w) or [""] for c, w in zip(row, widths, strict=True)]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)]
            lines.append(" | ".join(parts).rstrip())
        if n == 0 or n == len(rows):
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_terminal(result: ProbeResult) -> str:
    header, rows = table_rows(result)
    return text_table(header, rows, shutil.get_terminal_size(fallback=(160, 24)).columns)


def write_probe(result: ProbeResult, described: list[list[str]], examples_file: Path) -> None:
    """probe.md (table, runs, then every example in full) and probe.jsonl (one record per example)."""
    header, rows = table_rows(result)
    blocks = [
        Paragraph(
            f"Examples: `{examples_file}` ({len(result.examples)}). {MATCH} / {MISS}: the answer matches / "
            "does not match the expected one (as the task compares them; for QA: SQuAD exact match after "
            "normalisation). [No answer found]: the model gave no valid span."
        ),
        Table(header, rows),
        Heading("Runs"),
        Table(["Run", "Folder", "Method", "Model"], described),
        Heading("Examples"),
    ]
    for ex, shown in zip(result.examples, result.inputs, strict=True):
        details = "; ".join(f"{k}: {v}" for k, v in ex.fields.items() if k != "id" and v != shown)
        blocks.append(Paragraph(f"**{ex.id}** ({ex.category or 'no category'}) — {shown}  \n{details}"))
    write_atomic(result.output, to_markdown("peftlab probe", blocks))
    write_jsonl(
        result.output.with_suffix(".jsonl"),
        [
            {
                "id": ex.id,
                "category": ex.category,
                "input": result.inputs[i],
                "expected": ex.expected,
                "answers": {
                    label: {"answer": result.answers[label][i], "match": result.matches[label][i]}
                    for label in result.runs
                },
            }
            for i, ex in enumerate(result.examples)
        ],
    )
