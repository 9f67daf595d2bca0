"""WNUT-16 assets: the NER tweets and the QA set derived from them (entity spans as answers)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from peftlab.assets.catalog import WNUT16_FILE, _wnut16, _wnut16_qa, entity_spans, read_wnut16, wnut16_questions
from peftlab.store import read_jsonl

TWEETS = [
    [("Ann", "B-person"), ("met", "O"), ("Bob", "B-person"), ("Lee", "I-person"), ("in", "O"), ("Paris", "B-geo-loc")],
    [("I", "O"), ("love", "O"), ("Empire", "B-facility"), ("State", "I-facility"), ("Building", "I-facility")],
    [("no", "O"), ("entities", "O"), ("here", "O")],
    [("ann", "B-person"), ("MET", "O"), ("bob", "B-person"), ("lee", "I-person"), ("in", "O"), ("paris", "B-geo-loc")],
    [("Apple", "B-company"), ("rocks", "O")],
    [("apple", "B-product"), ("rocks", "O")],  # same text as the previous tweet, other tags: both dropped
] + [[(f"word{i}", "O"), (f"Town{i}", "B-geo-loc")] for i in range(14)]


def wheel(tweets: list) -> zipfile.ZipFile:
    text = "\t\n".join("".join(f"{tok}\t{tag}\n" for tok, tag in tweet) for tweet in tweets)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(WNUT16_FILE, text)
    return zipfile.ZipFile(io.BytesIO(buffer.getvalue()))


def test_reading_and_entity_spans() -> None:
    tweets = read_wnut16(wheel(TWEETS))
    assert len(tweets) == 20 and tweets[0]["tokens"][:2] == ["Ann", "met"] and tweets[0]["id"] == "wnut16-0"
    context = " ".join(tweets[0]["tokens"])
    spans = entity_spans(tweets[0]["tokens"], tweets[0]["tags"])
    assert [(k, context[a:b]) for k, a, b in spans] == [("person", "Ann"), ("person", "Bob Lee"), ("geo-loc", "Paris")]


def test_one_question_per_entity_type_with_every_entity_as_an_answer() -> None:
    questions = wnut16_questions(read_wnut16(wheel(TWEETS))[0])
    assert [q["id"] for q in questions] == ["wnut16-0-geo-loc", "wnut16-0-person"]
    person = questions[1]
    assert person["question"] == "Which person is mentioned in this tweet?"
    assert person["answers"] == {"text": ["Ann", "Bob Lee"], "answer_start": [0, 8]}
    assert person["context"] == "Ann met Bob Lee in Paris"
    assert wnut16_questions(read_wnut16(wheel(TWEETS))[2]) == []  # no entity, no question


def test_ner_and_qa_assets_share_tweets_and_splits(tmp_path: Path) -> None:
    ner = _wnut16(wheel(TWEETS), tmp_path / "ner")
    qa = _wnut16_qa(wheel(TWEETS), tmp_path / "qa")
    # 20 tweets: one case-insensitive duplicate copy removed, two conflicting copies dropped -> 17
    assert ner["dedup"]["kept"] == 17 and ner["dedup"]["duplicate_copies_removed"] == 1
    assert ner["dedup"]["conflicting_texts_dropped"] == 1 and sum(ner["splits"].values()) == 17
    assert qa["tweets"] == ner["splits"]
    for split in ("train", "validation", "test"):
        tweets = {r["id"] for r in read_jsonl(tmp_path / "ner" / f"{split}.jsonl")}
        questions = read_jsonl(tmp_path / "qa" / f"{split}.jsonl")
        assert {q["tweet_id"] for q in questions} <= tweets  # no tweet is in two splits
        for q in questions:
            for text, start in zip(q["answers"]["text"], q["answers"]["answer_start"], strict=True):
                assert q["context"][start : start + len(text)] == text
    row = read_jsonl(tmp_path / "ner" / "train.jsonl")[0]
    assert set(row) == {"id", "tokens", "tags"} and len(row["tokens"]) == len(row["tags"])
    again = _wnut16_qa(wheel(TWEETS), tmp_path / "qa2")
    assert (
        again == qa
        and (tmp_path / "qa2" / "train.jsonl").read_bytes() == (tmp_path / "qa" / "train.jsonl").read_bytes()
    )


@pytest.mark.integration
def test_real_wnut16_qa_asset_reads_as_squad() -> None:
    from peftlab import assets
    from peftlab.config import DataSpec
    from peftlab.data.loading import load_splits
    from peftlab.tasks import TASKS

    assets.fetch("wnut16-qa", log=lambda m: None)
    manifest = assets.manifest("wnut16-qa")
    assert manifest["tweets"] == {"train": 1825, "validation": 228, "test": 228}
    assert manifest["splits"] == {"train": 916, "validation": 126, "test": 99}
    splits = load_splits(DataSpec(source="asset:wnut16-qa"))
    examples = TASKS.get("qa")().prepare(splits, "asset:wnut16-qa")  # every answer checked against its context
    assert len(examples["test"]) == 99 and json.dumps(examples["test"][0])
