"""A tiny document model rendered twice: as Markdown and as one self-contained HTML page.

Why not a Markdown library: the report is built from structured blocks (headings, paragraphs,
tables, figures) anyway, so rendering them to both formats directly is shorter than generating
Markdown and converting it, and keeps the HTML free of external assets (figures are inlined).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    bold_rows: set[int] = field(default_factory=set)


@dataclass
class Figure:
    path: Path  # relative to the report's folder
    caption: str


@dataclass
class Figures:
    """Several figures shown side by side in HTML (one after another in Markdown)."""

    items: list[Figure]


Block = Heading | Paragraph | Table | Figure | Figures


def aligned_text(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """A table as terminal text: the first `left` columns left-aligned, the rest right-aligned
    (numbers), a dashed line under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("|" + "|".join("---" for _ in block.header) + "|")
            for i, row in enumerate(block.rows):
                cells = [f"**{_md_cell(c)}**" if i in block.bold_rows and c else _md_cell(c) for c in row]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif isinstance(block, Figure | Figures):
            for fig in block.items if isinstance(block, Figures) else [block]:
                out += [f"![{fig.caption}]({fig.path.as_posix()})", "", f"*{fig.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}tr.best td{font-weight:bold}
caption{caption-side:top;text-align:left;font-style:italic;padding:.3em 0}
figure{display:inline-block;margin:.5em 1em 1em 0;vertical-align:top}
figure img{max-width:560px;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
code{background:#f5f5f5;padding:0 .2em}
"""


def to_html(title: str, blocks: list[Block], base: Path) -> str:
    """A standalone page: CSS inline and figures embedded as base64 PNG."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Figure | Figures):
            out.append(
                "<div>"
                + "".join(_html_figure(f, base) for f in (block.items if isinstance(block, Figures) else [block]))
                + "</div>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only inline Markdown the report uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
    body = []
    for i, row in enumerate(table.rows):
        cls = " class='best'" if i in table.bold_rows else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_figure(fig: Figure, base: Path) -> str:
    data = base64.b64encode((base / fig.path).read_bytes()).decode("ascii")
    return (
        f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(fig.caption)}'>"
        f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
    )
