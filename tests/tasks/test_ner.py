"""NER: CoNLL reading, sub-word alignment, seqeval metrics on hand-computed cases, baselines, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from peftlab.data.conll import parse_conll
from peftlab.errors import InputError
from peftlab.models import ModelSource, load_tokenizer
from peftlab.tasks.ner import Ner, ner_metrics

DATA = Path(__file__).parents[1] / "data" / "tiny_ner"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSource(kind="random", ref="bert", arch="bert"))


def rows(*sentences: tuple[list[str], list[str]]) -> Dataset:
    return Dataset.from_list([{"id": f"s{i}", "tokens": t, "tags": g} for i, (t, g) in enumerate(sentences)])


def test_parse_conll_sentences_columns_and_docstart() -> None:
    text = "-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n"
    out = parse_conll(text, "f.conll")
    assert [(r["tokens"], r["tags"], r["where"]) for r in out] == [
        (["EU", "rejects"], ["B-ORG", "O"], "f.conll:3"),
        (["Peter"], ["B-PER"], "f.conll:6"),
    ]


@pytest.mark.parametrize(
    ("text", "line"), [("a\tO\nb\tO\textra\n", 2), ("a\tO\n\nb\n", 3), ("a O\nb\n", 2), ("a\t\n", 1)]
)
def test_parse_conll_wrong_columns_names_file_and_line(text: str, line: int) -> None:
    with pytest.raises(InputError, match=rf"f\.conll:{line}: expected 2 columns"):
        parse_conll(text, "f.conll")


def test_alignment_first_subtoken_and_all_subtokens(tokenizer) -> None:
    examples = rows((["alice", "went", "to", "tokyo"], ["B-person", "O", "O", "B-location"]))
    assert tokenizer.tokenize("alice tokyo") == ["al", "##ic", "##e", "to", "##k", "##y", "##o"]
    task = Ner()
    task.prepare(DatasetDict({"train": examples}), "t")
    assert task.labels == ["O", "B-location", "I-location", "B-person", "I-person"]
    first = task.featurize(task.prepare(DatasetDict({"train": examples}), "t")["train"], tokenizer, 32)[0]
    # [CLS] al ##ic ##e went to to ##k ##y ##o [SEP]
    assert first["word_ids"] == [-1, 0, 0, 0, 1, 2, 3, 3, 3, 3, -1]
    assert first["labels"] == [-100, 3, -100, -100, 0, 0, 1, -100, -100, -100, -100]
    every = Ner(label_all_subtokens=True)
    every_features = every.featurize(every.prepare(DatasetDict({"train": examples}), "t")["train"], tokenizer, 32)
    assert every_features[0]["labels"] == [-100, 3, 4, 4, 0, 0, 1, 2, 2, 2, -100]


def test_predict_uses_first_subtoken_and_truncated_words_are_o(tokenizer) -> None:
    task = Ner()
    examples = task.prepare(
        DatasetDict({"train": rows((["alice", "went", "to", "tokyo"], ["B-person", "O", "O", "B-location"]))}), "t"
    )["train"]
    features = task.featurize(examples, tokenizer, 6)  # [CLS] al ##ic ##e went [SEP]: 'to tokyo' cut
    logits = np.full((1, 6, 5), -1.0)
    logits[0, 1, 3] = logits[0, 2, 1] = logits[0, 4, 0] = 5.0  # al -> B-person, ##ic -> B-location (ignored)
    prediction = task.predict(logits, examples, features)[0]
    assert prediction["prediction"] == ["B-person", "O", "O", "O"] and prediction["truncated_words"] == 2
    scores = task.score([prediction])
    assert scores["n_truncated"] == 1 and scores["recall"] == 0.5 and scores["precision"] == 1.0


def test_metrics_hand_computed() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC", "B-PER"]]
    m = ner_metrics(gold, pred)
    # entities: gold PER(0-1), LOC(3), LOC(s2:1); predicted PER(0-1), LOC(s2:1), PER(s2:2) -> 2 correct
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["token_accuracy"] == pytest.approx(5 / 7)
    assert m["per_class"]["PER"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert m["per_class"]["LOC"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_default_mode_is_conlleval_strict_mode_is_iob2() -> None:
    gold, pred = [["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]]
    assert ner_metrics(gold, pred)["f1"] == 1.0  # conlleval: an I- after O starts the entity
    assert ner_metrics(gold, pred, strict=True)["f1"] == 0.0  # IOB2 strict: no entity predicted


def test_hub_classlabel_ids_become_names() -> None:
    names = ["O", "B-corporation", "I-corporation"]
    features = Features(
        {"id": Value("string"), "tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names))}
    )
    ds = Dataset.from_dict({"id": ["0"], "tokens": [["Acme", "Corp", "rocks"]], "ner_tags": [[1, 2, 0]]}, features)
    task = Ner()
    out = task.prepare(DatasetDict({"train": ds}), "hub")
    assert task.labels == names and out["train"][0]["tags"] == ["B-corporation", "I-corporation", "O"]


def test_conll_folder_loads_and_labels_are_fitted_on_train() -> None:
    from peftlab.config import DataSpec
    from peftlab.data.loading import load_splits

    splits = load_splits(DataSpec(source=str(DATA)))
    task = Ner()
    out = task.prepare(splits, str(DATA))
    assert task.labels == ["O", "B-location", "I-location", "B-person", "I-person"]
    assert len(out["train"]) == 40 and out["validation"][0]["tokens"]


def test_tag_outside_label_set_names_file_and_line(tmp_path: Path) -> None:
    from peftlab.config import DataSpec
    from peftlab.data.loading import load_splits

    (tmp_path / "train.conll").write_text("john\tB-person\nwent\tO\n\nmary\tB-person\n")
    (tmp_path / "validation.conll").write_text("paris\tB-location\n")
    (tmp_path / "test.conll").write_text("x\tO\n\npeter\tB-person\nsaw\tO\nrome\tB-city\n")
    splits = load_splits(DataSpec(source=str(tmp_path)))
    fitted = Ner()
    fitted.prepare(splits, "d")  # fitted on every split: validation's location type is in the set
    assert fitted.labels == ["O", "B-city", "I-city", "B-location", "I-location", "B-person", "I-person"]
    with pytest.raises(InputError, match=r"test\.conll:3: word 3 \('rome'\): tag 'B-city' is not in"):
        Ner(labels=["O", "B-person", "I-person", "B-location", "I-location"]).prepare(splits, "d")
    new = Dataset.from_list([{"id": "n1", "tokens": ["oslo"], "tags": ["B-town"]}])
    with pytest.raises(InputError, match=r"new: example n1 \(row 1\): word 1 \('oslo'\): tag 'B-town' is not in"):
        fitted.examples_from_rows(new, "new")


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ((["a", "b"], ["O"]), "example s0 \\(row 1\\): 2 words but 1 tags"),
        ((["a"], ["PER"]), "tag 'PER' is not a BIO tag"),
        (([], []), "must be a non-empty list"),
    ],
)
def test_bad_rows_name_the_example(sentence: tuple, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        Ner(labels=["O", "B-PER", "I-PER"]).prepare(DatasetDict({"train": rows(sentence)}), "d [train]")


def test_baselines_all_o_and_memorised_tags() -> None:
    train = rows((["John", "met", "Mary"], ["B-PER", "O", "B-PER"]), (["john", "left"], ["B-PER", "O"]))
    test = rows((["John", "saw", "Bob"], ["B-PER", "O", "B-PER"]))
    task = Ner()
    task.prepare(DatasetDict({"train": train}), "t")
    baselines = task.baselines(train)
    all_o = task.score(baselines["all O"](test))
    memorised = task.score(baselines["memorised tags"](test))
    assert all_o["f1"] == 0.0 and all_o["token_accuracy"] == pytest.approx(1 / 3)
    assert memorised["precision"] == 1.0 and memorised["recall"] == 0.5  # Bob is unseen -> O
