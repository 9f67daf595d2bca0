"""`peftlab eval` and `peftlab predict`: a trained run on new data.

Results of `eval` go to <run>/evals/<name>/ (metrics.json, predictions.jsonl), never over the
run's own metrics.json or predictions/, so evaluating on out-of-domain data loses nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from datasets import Dataset

from peftlab.errors import InputError
from peftlab.store import write_json, write_jsonl
from peftlab.trained import examples_for, load_run, slug


def evaluate_run(run_dir: Path, data: str, split: str | None, name: str | None = None) -> dict[str, Any]:
    """Score a finished run on `data`; write metrics and predictions under <run>/evals/<name>/."""
    run = load_run(run_dir)
    examples, where = examples_for(run, data, split)
    predictions = run.predict(examples)
    metrics = run.task.score(predictions)
    out = run.folder.path / "evals" / slug(name or f"{data}-{split or 'default'}")
    write_jsonl(out / "predictions.jsonl", predictions)
    result = {"data": where, "n": len(predictions), "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": metrics}
    write_json(out / "metrics.json", result)
    print(
        f"{run.folder.name} on {where}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
        file=sys.stderr,
    )
    print(f"written to {out}", file=sys.stderr)
    return result


def predict_run(run_dir: Path, source: str, output: str | None = None) -> list[dict[str, Any]]:
    """Predictions for unlabelled inputs: a json/jsonl/csv file, or text lines on stdin ('-')."""
    run = load_run(run_dir)
    if source == "-":
        lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not lines:
            raise InputError("predict --input -: no text on standard input (one example per line)")
        rows = Dataset.from_list([_row_from_line(line, i) for i, line in enumerate(lines)])
        examples = run.task.examples_from_rows(rows, "stdin", labelled=False)
    else:
        examples, _ = examples_for(run, source, None, labelled=False)
    predictions = run.predict(examples)
    if output:
        write_jsonl(Path(output), predictions)
    else:
        for row in predictions:
            print(json.dumps(row, ensure_ascii=False))
    return predictions


def _row_from_line(line: str, index: int) -> dict[str, Any]:
    """A stdin line is either a JSON object (any task's fields) or plain text."""
    if line.lstrip().startswith("{"):
        try:
            return {"id": str(index), **json.loads(line)}
        except json.JSONDecodeError as exc:
            raise InputError(f"stdin line {index + 1}: looks like JSON but is not valid: {exc}") from None
    return {"id": str(index), "text": line}
