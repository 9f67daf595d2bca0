"""report.html as a reader gets it: one self-contained file (parsed with the standard library), and
the same page in a real headless browser where one is installed (figures load, nothing overflows the
page sideways, headers sort). Built from one tiny finished experiment (two runs on a tiny random model)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from peftlab.report.render import Heading, Paragraph, Table, sort_value, to_html
from tests.conftest import tiny_experiment, write_experiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of a finished tiny experiment: full fine-tuning and LoRA, one short epoch each."""
    tmp_path = tmp_path_factory.mktemp("html")
    train = {"epochs": 1, "batch_size": 16, "precision": "fp32"}
    exp = tiny_experiment(tmp_path, methods={"full": {}, "lora": {"r": 4}}, train=train)
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    return tmp_path / "runs" / "tiny" / "report.html"


class Page(HTMLParser):
    """Every tag with its attributes, and the text of each inline script."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]


def test_report_html_is_one_self_contained_file(report: Path) -> None:
    page = Page()
    page.feed(report.read_text(encoding="utf-8"))
    images = page.all("img")
    assert len(images) >= 5  # learning curves, confusion matrices, label shares, the two comparison figures
    for img in images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)
        assert img.get("alt")
    assert any("against trainable parameters" in img["alt"] for img in images)
    assert any("against training time" in img["alt"] for img in images)
    for tag, attrs in page.tags:  # nothing is fetched: no links, sources, styles or scripts outside the file
        for name in ("src", "href", "srcset", "poster", "data", "action", "background"):
            value = attrs.get(name)
            if value is not None and tag != "img":
                assert value.startswith("#"), f"<{tag} {name}={value!r}>"
        assert not (tag == "link" and "stylesheet" in attrs.get("rel", "")), attrs
        assert not (tag == "script" and "src" in attrs), attrs
        assert "url(" not in attrs.get("style", ""), attrs
    styles = report.read_text(encoding="utf-8").split("<style>", 1)[1].split("</style>", 1)[0]
    assert "@import" not in styles and "url(" not in styles
    assert len(page.scripts) == 1 and "fetch(" not in page.scripts[0] and "http" not in page.scripts[0]
    tables = page.all("table")
    assert tables and all(t.get("class") == "sortable" for t in tables)
    cells = [attrs for attrs in page.all("td") if "data-v" in attrs]
    assert cells and all(float(c["data-v"]) == float(c["data-v"]) for c in cells)  # numbers, no NaN


def test_every_table_sorts_and_scrolls_in_its_own_box(tmp_path: Path) -> None:
    tables = [Table(["Run", "Params"], [["a", "1,234"], ["b", "—"]]), Table(["x"], [["2"]], "cap", {0})]
    text = to_html("t", [Heading("h"), *tables, Paragraph("p")], tmp_path)
    assert text.count("<div class='table-wrap'><table class='sortable'>") == 2
    assert "<div class='table-caption'>cap</div><div class='table-wrap'>" in text  # read whole, not scrolled
    assert "<td data-v='1234.0'>1,234</td>" in text and "<td>—</td>" in text and "<td>a</td>" in text
    assert text.count("<script>") == 1 and text.index("<script>") > text.rindex("</table>")
    assert "<script>" not in to_html("t", [Paragraph("no tables")], tmp_path)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", 1234.0),
        ("0.7123 ± 0.0040", 0.7123),
        ("+0.0100", 0.01),
        ("\u22120.5", -0.5),
        ("12.5%", 12.5),
        ("41.0% (true 40.0%)", 41.0),
        ("67M", 67e6),
        ("9.2K", 9200.0),
        ("12.3 s", 12.3),
        ("3 min 05 s", 185.0),
        ("1e-3", 0.001),
        ("—", None),
        ("", None),
        ("lora", None),
        ("lr 0.001", None),
        ("2/2", None),
        ("full (reference)", None),
    ],
)
def test_sort_value_reads_the_numbers_tables_show(text: str, value: float | None) -> None:
    assert sort_value(text) == value


# --- in a real browser ----------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WIDTH = 720  # narrower than the results table: its box must scroll, the page must not

# Runs in the page after load: what the reader would see, written into a hidden element for --dump-dom.
CHECK = """
<script>
window.addEventListener("load", function () {
  var out = {errors: window.__errors};
  var root = document.documentElement;
  out.viewport = root.clientWidth;
  out.page = Math.max(root.scrollWidth, document.body.scrollWidth);
  out.images = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.alt, width: img.naturalWidth, complete: img.complete,
            right: img.getBoundingClientRect().right};
  });
  out.tables = Array.prototype.map.call(document.querySelectorAll("table"), function (table) {
    var box = table.parentElement, style = getComputedStyle(box);
    return {width: table.scrollWidth, right: table.getBoundingClientRect().right,
            scrolls: box.classList.contains("table-wrap") && /auto|scroll/.test(style.overflowX),
            box: box.clientWidth, boxRight: box.getBoundingClientRect().right};
  });
  out.resources = performance.getEntriesByType("resource").map(function (e) { return e.name; });
  var results = document.querySelector("table.sortable");
  var heads = Array.prototype.slice.call(results.querySelectorAll("thead th"));
  function column(name) {
    var col = heads.findIndex(function (h) { return h.textContent.indexOf(name) === 0; });
    return Array.prototype.map.call(results.tBodies[0].rows, function (r) { return r.cells[col].textContent; });
  }
  function click(name) {
    heads.find(function (h) { return h.textContent.indexOf(name) === 0; }).click();
    return column(name);
  }
  out.sorted = {params_up: click("Trainable params"), params_down: click("Trainable params"), run_up: click("Run")};
  var pre = document.createElement("pre");
  pre.hidden = true;
  pre.id = "peftlab-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""
ERRORS = (  # script errors of the page, collected from the start
    "<script>window.__errors=[];"
    "window.addEventListener('error',function(e){window.__errors.push(String(e.message))});</script>"
)


def _browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def _in_browser(browser: str, page: Path, tmp_path: Path) -> dict:
    """Open `page` in headless Chromium (no network: every host unresolvable) and return what CHECK saw."""
    args = [
        browser,
        "--headless",
        "--no-sandbox",  # as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={WIDTH},900",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    found = re.search(r'<pre[^>]*id="peftlab-check"[^>]*>(.*?)</pre>', done.stdout, re.S)
    assert found, f"no result from {browser} (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found[1]))


def test_report_in_a_headless_browser(report: Path, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium or Chrome installed (apt-get install chromium)")
    text = report.read_text(encoding="utf-8")
    page = tmp_path / "report.html"
    page.write_text(text.replace("</head>", ERRORS + "</head>", 1).replace("</body>", CHECK + "</body>", 1))
    seen = _in_browser(browser, page, tmp_path)
    assert seen["errors"] == [], seen["errors"]
    assert seen["resources"] == [], seen["resources"]  # nothing fetched: figures are data: URIs
    assert len(seen["images"]) == text.count("<img ")
    for img in seen["images"]:
        assert img["complete"] and img["width"] > 0, img
        assert img["right"] <= seen["viewport"] + 1, img
    assert seen["page"] <= seen["viewport"], f"the page scrolls sideways: {seen['page']} > {seen['viewport']}"
    for table in seen["tables"]:  # fits the page, or scrolls in its own box that does
        assert table["width"] <= seen["viewport"] or table["scrolls"], table
        assert table["boxRight"] <= seen["viewport"] + 1, table
    assert any(t["width"] > t["box"] and t["scrolls"] for t in seen["tables"])  # the results table at 720 px
    sorted_ = seen["sorted"]
    assert sorted_["params_up"][:2] == ["1,123", "101,667"] and sorted_["params_up"][2:] == ["—", "—"]
    assert sorted_["params_down"][:2] == ["101,667", "1,123"] and sorted_["params_down"][2:] == ["—", "—"]
    assert sorted_["run_up"] == sorted(sorted_["run_up"], key=str.lower)
