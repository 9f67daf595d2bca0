"""Hostile or damaged input files: exit 2 naming the file (and line), never a traceback, and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.config import DataSpec, load_experiment
from peftlab.data.loading import load_splits
from peftlab.errors import EXIT_BAD_INPUT, InputError
from peftlab.store import read_json, read_jsonl
from tests.conftest import DATA

BILLION_LAUGHS = """
name: a
methods: {lora: {}}
x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
x1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]
x2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]
x3: &a3 [*a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2]
x4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3]
x5: &a5 [*a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4]
x6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5]
x7: &a7 [*a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6]
x8: &a8 [*a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7]
"""


def test_nested_aliases_are_rejected_before_they_expand(tmp_path: Path, capsys) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    assert main(["plan", str(path)]) == EXIT_BAD_INPUT
    assert "its aliases expand to 1,234,567,915 values (at most 100,000)" in capsys.readouterr().err


def test_a_few_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(
        f"""
name: aliases
model: {{arch: bert, random_init: true, config: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}}}
task: classification
data: {{source: {DATA / "tiny_cls"}}}
methods:
  lora_a: &lora {{method: lora, r: 4, alpha: 8}}
  lora_b: *lora
"""
    )
    runs = load_experiment(path).runs
    assert [(r.name, r.settings["r"]) for r in runs] == [("lora_a", 4), ("lora_b", 4)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: caf\xe9\n", r"exp.yaml:1: not valid UTF-8 text \(byte 9"),
        (b"name: a\n" + b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"nested too deep|not valid YAML"),
        (b"\x00\x01binary\xff", r"not valid UTF-8"),
    ],
)
def test_experiment_files_that_are_not_text_are_exit_2(tmp_path: Path, capsys, content: bytes, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_a_huge_experiment_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.truncate(2 << 20)  # sparse: 2 MiB of zero bytes
    with pytest.raises(InputError, match=r"huge.yaml: 2,097,152 bytes; a file of this kind has at most 1,048,576"):
        load_experiment(path)


def test_data_files_in_another_encoding_name_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    good = (DATA / "tiny_cls" / "train.jsonl").read_bytes()
    (folder / "train.jsonl").write_bytes(good + '{"text": "café", "label": "pos"}\n'.encode("latin-1"))
    line = good.count(b"\n") + 1
    with pytest.raises(InputError, match=rf"train.jsonl:{line}: not valid UTF-8"):
        load_splits(DataSpec(source=str(folder)))
    (folder / "train.conll").write_bytes(b"Caf\xe9\tO\n")
    (folder / "train.jsonl").unlink()
    with pytest.raises(InputError, match=r"train.conll:1: not valid UTF-8"):
        load_splits(DataSpec(source=str(folder)))


def test_truncated_and_deeply_nested_json(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "lab')
    with pytest.raises(InputError, match=r"rows.jsonl:2: not valid JSON"):
        read_jsonl(tmp_path / "rows.jsonl")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(InputError, match=r"deep.jsonl:1: JSON nested too deep"):
        read_jsonl(tmp_path / "deep.jsonl")
    (tmp_path / "status.json").write_text('{"state": "do')
    with pytest.raises(InputError, match=r"status.json:1: not valid JSON"):
        read_json(tmp_path / "status.json")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(InputError, match=r"folder.json: is a folder"):
        read_json(tmp_path / "folder.json")
    assert json.loads('"ok"') == "ok"
