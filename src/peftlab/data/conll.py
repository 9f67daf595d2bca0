"""CoNLL-style column files: one token per line, its tag in the last column, a blank line between sentences.

Used by the data loader (`.conll` files) and by the `wnut16` asset converter. Columns are split on
tabs when the file's first token line has a tab (tokens may then hold spaces), else on whitespace.
Every token line must have as many columns as the first one (2 for token<TAB>tag; CoNLL-2003's
4-column files work too: the first column is the token, the last the tag). `-DOCSTART-` lines
(document separators) are skipped. Hand-written: `datasets` has no CoNLL reader, and the format
is a dozen lines to parse with errors that name the file and line.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import InputError


def parse_conll(text: str, where: str, prefix: str = "s") -> list[dict[str, Any]]:
    """Sentences as rows {id, tokens, tags, where}; where = 'FILE:LINE' of the sentence's first word."""
    rows: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    columns: int | None = None
    use_tabs = False

    def flush() -> None:
        if tokens:
            rows.append(
                {"id": f"{prefix}-{len(rows)}", "tokens": list(tokens), "tags": list(tags), "where": f"{where}:{start}"}
            )
            tokens.clear()
            tags.clear()

    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            flush()
            continue
        if line.split()[0] == "-DOCSTART-":
            flush()
            continue
        if columns is None:
            use_tabs = "\t" in line
        parts = [p.strip() for p in line.split("\t")] if use_tabs else line.split()
        if columns is None:
            columns = len(parts)
        if len(parts) != columns or columns < 2 or not parts[0] or not parts[-1]:
            raise InputError(
                f"{where}:{number}: expected {max(columns, 2)} columns (token ... tag, separated by "
                f"{'tabs' if use_tabs else 'spaces'}) as on the first token line, got {len(parts)}: {line[:80]!r}"
            )
        if not tokens:
            start = number
        tokens.append(parts[0])
        tags.append(parts[-1])
    flush()
    return rows
