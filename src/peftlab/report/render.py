"""A tiny document model rendered twice: as Markdown and as one self-contained HTML page.

Why not a Markdown library: the report is built from structured blocks (headings, paragraphs,
tables, figures) anyway, so rendering them to both formats directly is shorter than generating
Markdown and converting it, and keeps the HTML free of external assets (figures are inlined).

In the HTML every table sorts by a click on a header (one small inline script; numbers sort as
numbers, "—" and empty cells last in either direction) and scrolls sideways in its own box when it
is wider than the page, so the page itself never does.
"""

from __future__ import annotations

import base64
import html
import math
import re
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
p{overflow-wrap:anywhere}
.table-wrap{max-width:100%;overflow-x:auto;margin:.3em 0 1.5em}
.table-caption{font-style:italic;margin-top:.5em}
table{border-collapse:collapse;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}tr.best td{font-weight:bold}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e4e4e4}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:.7em}
th[aria-sort=descending]::after{content:" \\25BC";font-size:.7em}
figure{display:inline-block;margin:.5em 1em 1em 0;vertical-align:top;max-width:100%}
figure img{max-width:min(560px,100%);height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
code{background:#f5f5f5;padding:0 .2em}
"""

# Click a header to sort its table (again: the other way). A cell's data-v is its number, read once
# when the page is written (sort_value); cells without one sort as text after the numbers, and
# "—" or empty cells last in either direction. Ties keep their order.
SORT_SCRIPT = """
(function () {
  var EMPTY = ["", "\\u2014", "\\u2013", "-"];
  function key(cell) {
    if (!cell) return [2, ""];
    if (cell.hasAttribute("data-v")) return [0, parseFloat(cell.getAttribute("data-v"))];
    var text = cell.textContent.trim();
    return EMPTY.indexOf(text) >= 0 ? [2, ""] : [1, text];
  }
  function compare(a, b, asc) {
    if (a[0] !== b[0]) return a[0] - b[0];
    if (a[0] === 2) return 0;
    var d = a[0] === 0 ? a[1] - b[1] : a[1].localeCompare(b[1], undefined, {numeric: true});
    return asc ? d : -d;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      function sort() {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        Array.prototype.slice.call(body.rows)
          .map(function (row, i) { return [key(row.cells[col]), i, row]; })
          .sort(function (a, b) { return compare(a[0], b[0], asc) || a[1] - b[1]; })
          .forEach(function (item) { body.appendChild(item[2]); });
      }
      th.tabIndex = 0;
      th.title = "Sort by this column";
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
})();
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
    if any(isinstance(block, Table) for block in blocks):
        out.append(f"<script>{SORT_SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only inline Markdown the report uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(table: Table) -> str:
    """A sortable table in a box that scrolls sideways when the table is wider than the page."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
    body = []
    for i, row in enumerate(table.rows):
        cls = " class='best'" if i in table.bold_rows else ""
        body.append(f"<tr{cls}>" + "".join(_html_cell(c) for c in row) + "</tr>")
    # the caption stays outside the scrolling box, so that it reads whole however wide the table is
    caption = f"<div class='table-caption'>{html.escape(table.caption)}</div>" if table.caption else ""
    return (
        f"{caption}<div class='table-wrap'><table class='sortable'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _html_cell(cell: Any) -> str:
    value = sort_value(str(cell))
    number = f" data-v='{value!r}'" if value is not None else ""
    return f"<td{number}>{html.escape(str(cell))}</td>"


_NUMBER = re.compile(
    r"(?P<num>[+\-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+\-]?\d+)?)"
    r"\s*(?P<unit>%|K|M|B|s)?"
    r"(?:\s*(?:±.*|\(.*\)))?"
)
_DURATION = re.compile(r"(?P<min>\d+) min (?P<sec>\d+(?:\.\d+)?) s")
_SCALE = {"K": 1e3, "M": 1e6, "B": 1e9}


def sort_value(text: str) -> float | None:
    """The number a table cell shows, for sorting: "1,234", "0.71 ± 0.02", "+0.0100", "12.5%",
    "67M" / "9.2K" (parameter counts), "12.3 s" and "3 min 05 s" (seconds); None for text, "—"
    and empty cells."""
    text = text.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        return 60 * int(duration["min"]) + float(duration["sec"])
    match = _NUMBER.fullmatch(text)
    if not match or not any(ch.isdigit() for ch in match["num"]):
        return None
    try:
        value = float(match["num"].replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None
    value *= _SCALE.get(match["unit"] or "", 1.0)
    return value if math.isfinite(value) else None


def _html_figure(fig: Figure, base: Path) -> str:
    data = base64.b64encode((base / fig.path).read_bytes()).decode("ascii")
    return (
        f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(fig.caption)}'>"
        f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
    )
