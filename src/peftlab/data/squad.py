"""SQuAD JSON documents (the official `train-v1.1.json` / `dev-v1.1.json` layout) as flat rows.

A SQuAD document nests questions under paragraphs under articles:
`{version, data: [{title, paragraphs: [{context, qas: [{id, question, answers: [{text, answer_start}]}]}]}]}`.
The rows produced have the hub `squad` dataset's layout (id, title, context, question,
answers {text: [...], answer_start: [...]}), so a local file and the hub dataset reach the QA task
the same way. This is a file format, like CSV: the loader recognises it by its shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.errors import InputError


def is_squad_document(doc: Any) -> bool:
    """A JSON object with a `data` list of articles that have `paragraphs`."""
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("data"), list)
        and all(isinstance(a, dict) and "paragraphs" in a for a in doc["data"])
    )


def read_squad_json(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a SQuAD JSON document, or None when the file is not one (e.g. JSON lines)."""
    from peftlab.store import read_text

    try:
        doc = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError):
        return None
    if not is_squad_document(doc):
        return None
    return squad_rows(doc, str(path))


def squad_rows(doc: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Flatten a SQuAD document; InputError naming the article/paragraph/question when malformed."""
    version = str(doc.get("version", ""))
    if version.lstrip("v").startswith("2"):
        raise InputError(
            f"{where}: SQuAD version {version}: unanswerable questions (v2) are not supported; use SQuAD v1.1"
        )
    rows = []
    for i, article in enumerate(doc["data"]):
        paragraphs = article["paragraphs"]
        if not isinstance(paragraphs, list):
            raise InputError(f"{where}: data[{i}].paragraphs: expected a list of {{context, qas}}")
        for j, paragraph in enumerate(paragraphs):
            at = f"{where}: data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise InputError(f"{at}: expected {{context, qas: [...]}}")
            for k, qa in enumerate(paragraph["qas"]):
                rows.append(_row(qa, paragraph.get("context"), article.get("title", ""), f"{at}.qas[{k}]"))
    if not rows:
        raise InputError(f"{where}: a SQuAD document without questions")
    return rows


def _row(qa: Any, context: Any, title: str, at: str) -> dict[str, Any]:
    if not isinstance(qa, dict) or "id" not in qa or "question" not in qa:
        raise InputError(f"{at}: expected {{id, question, answers: [{{text, answer_start}}]}}")
    if qa.get("is_impossible"):
        raise InputError(f"{at} (id {qa['id']}): is_impossible is SQuAD v2; only SQuAD v1.1 is supported")
    answers = qa.get("answers") or []
    if not all(isinstance(a, dict) for a in answers):
        raise InputError(f"{at} (id {qa['id']}): answers must be a list of {{text, answer_start}}")
    for answer in answers:  # checked here, as mixed types would stop the table conversion without an id
        start = answer.get("answer_start")
        if not isinstance(start, int) or isinstance(start, bool):
            raise InputError(f"{at} (example {qa['id']}): answer_start must be a character index, got {start!r}")
    return {
        "id": str(qa["id"]),
        "title": title,
        "context": context,
        "question": qa["question"],
        "answers": {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]},
    }
