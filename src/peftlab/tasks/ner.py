"""Named-entity recognition: BIO token classification (WNUT-16/17, CoNLL-2003, your own files).

Inputs: rows with a list of words (`tokens`) and one BIO tag per word (`tags`, or the hub's
`ner_tags`: integer ids with ClassLabel names), from jsonl/json, CoNLL column files (`.conll`:
token<TAB>tag, a blank line between sentences), an asset (`wnut16`) or the hub (`wnut_17`,
`conll2003`).

Labels: `task.labels` when given; else the hub's tag names; else fitted on the data: every entity
type that occurs in any split (so a train limit cannot drop a rare type), as B- and I-, "O" first.
A tag outside the label set (not in `task.labels` or the hub's names, or, for `eval`/`predict`,
not in the run's labels) or a non-BIO tag is an error naming the file and line (CoNLL) or the
example id, and the word.

Sub-words: each word's first sub-token carries its tag; the others are ignored in the loss (-100),
or, with `label_all_subtokens: true`, carry the word's tag with B- turned into I- (as transformers'
run_ner does). A word's prediction is always its first sub-token's.

Long sentences: a sentence with more sub-tokens than `max_length` is truncated; its cut words are
predicted "O" (so their entities count as missed), and each split's metrics count such sentences
(`n_truncated`) so the repair is visible in the report.

Metrics (seqeval): entity-level precision, recall and F1 (micro over entities) and per entity type,
in seqeval's default mode, which scores chunks as conlleval does (an I-X after O starts an entity);
`mode: strict` uses the IOB2 scheme strictly (such an I-X is no entity). Token accuracy is
seqeval's accuracy over words, "O" included (the study's "Acc").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from peftlab.errors import InputError
from peftlab.models import ModelSource, instantiate
from peftlab.registry import TASKS
from peftlab.tasks.base import LabelledTask, Prediction, TaskOptions

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from torch import nn

BIO = re.compile(r"^(O|[BI]-.+)$")
TAG_FIELDS = ("tags", "ner_tags")


class NerOptions(TaskOptions):
    tokens_field: str = Field("tokens", description="the field holding the list of words")
    tags_field: str | None = Field(None, description="the field holding the BIO tags; default: tags, then ner_tags")
    labels: list[str] | None = Field(None, min_length=2, description="the BIO tag set; default: from the data")
    label_all_subtokens: bool = Field(False, description="train on every sub-token, not only a word's first")
    mode: Literal["default", "strict"] = Field(
        "default", description="seqeval: default = conlleval-compatible chunks; strict = IOB2 scheme, exact"
    )


def entity_types(labels: list[str]) -> list[str]:
    return sorted({tag[2:] for tag in labels if tag != "O"})


def bio_labels(tags: set[str]) -> list[str]:
    """'O' first, then B-/I- of each type seen (both, even if only one occurs), types sorted."""
    return ["O"] + [f"{prefix}-{kind}" for kind in entity_types(list(tags)) for prefix in ("B", "I")]


@TASKS.register("ner")
class Ner(LabelledTask):
    """Token classification with BIO tags and entity-level metrics."""

    Options = NerOptions
    peft_task_type = "TOKEN_CLS"
    primary_metric = "f1"
    higher_is_better: ClassVar[dict[str, bool]] = {
        "f1": True,
        "precision": True,
        "recall": True,
        "token_accuracy": True,
    }
    headline_metrics = ("token_accuracy", "f1")
    bookkeeping_columns = ("word_ids",)

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        names = self._tag_names(splits["train"]) if "train" in splits else None
        if self.options.labels is None:
            self.options.labels = names
        from datasets import DatasetDict

        canonical = DatasetDict({name: self._canonical(ds, f"{where} [{name}]") for name, ds in splits.items()})
        if self.options.labels is None:  # every split's tags: a train limit must not drop a rare type
            self.options.labels = bio_labels({tag for ds in canonical.values() for tags in ds["tags"] for tag in tags})
        if len(self.labels) < 2:
            raise InputError(f"{where} [train]: no entity tags at all (only 'O'); nothing to learn")
        for name, ds in splits.items():
            self._check_tags(canonical[name], ds, f"{where} [{name}]")
        return canonical

    def needs_data_to_build(self) -> bool:
        return self.options.labels is None  # the tag set sizes the head

    def assume_without_data(self) -> str:
        if self.options.labels is not None:
            return f"using task.labels ({len(self.labels)} tags)"
        self.options.labels = ["O", "B-X", "I-X"]
        return "the token-classification head is counted with 3 tags; set task.labels for the exact count"

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        if self.options.tokens_field not in rows.column_names and "text" in rows.column_names and not labelled:
            rows = rows.map(lambda r: {self.options.tokens_field: r["text"].split()})  # plain text: split on spaces
        examples = self._canonical(rows, where, labelled)
        if labelled:
            self._check_tags(examples, rows, where)
        return examples

    def _tags_field(self, ds: Dataset) -> str | None:
        if self.options.tags_field:
            return self.options.tags_field if self.options.tags_field in ds.column_names else None
        return next((f for f in TAG_FIELDS if f in ds.column_names), None)

    def _tag_names(self, ds: Dataset) -> list[str] | None:
        """Tag names of the hub's Sequence(ClassLabel) feature, when the data has one."""
        field = self._tags_field(ds)
        feature = getattr(ds.features.get(field), "feature", None) if field else None
        names = getattr(feature, "names", None)
        return list(names) if names else None

    def _canonical(self, ds: Dataset, where: str, labelled: bool = True) -> Dataset:
        opts = self.options
        tags_field = self._tags_field(ds)
        missing = [opts.tokens_field] if opts.tokens_field not in ds.column_names else []
        missing += [opts.tags_field or "tags"] if labelled and tags_field is None else []
        if missing:
            raise InputError(
                f"{where}: no field {', '.join(map(repr, missing))} (fields: {', '.join(ds.column_names)});"
                " set task.tokens_field / task.tags_field"
            )
        names = self._tag_names(ds)
        ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        rows = []
        for i, row in enumerate(ds):
            ref = _ref(where, row, ids[i], i)
            tokens = row[opts.tokens_field]
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
                raise InputError(f"{ref}: '{opts.tokens_field}' must be a non-empty list of non-empty words")
            tags = self._tag_strings(row.get(tags_field) if tags_field else None, names, ref)
            if tags is not None and len(tags) != len(tokens):
                raise InputError(f"{ref}: {len(tokens)} words but {len(tags)} tags")
            rows.append({"id": str(ids[i]), "tokens": tokens, "tags": tags})
        from datasets import Dataset

        return Dataset.from_list(rows)

    def _tag_strings(self, tags: Any, names: list[str] | None, ref: str) -> list[str] | None:
        """Tags as names: hub ids through the ClassLabel names (or task.labels), strings as they are."""
        if tags is None:
            return None
        if not isinstance(tags, list):
            raise InputError(f"{ref}: tags must be a list (one tag per word), got {type(tags).__name__}")
        table = names or self.options.labels
        out = []
        for tag in tags:
            if isinstance(tag, int) and not isinstance(tag, bool):
                if table is None or not 0 <= tag < len(table):
                    raise InputError(
                        f"{ref}: tag id {tag} has no name (the data has no tag names; give them with task.labels)"
                    )
                tag = table[tag]
            out.append(str(tag))
        return out

    def _check_tags(self, examples: Dataset, raw: Dataset, where: str) -> None:
        """Every tag is BIO and in the label set; the error names the line (CoNLL) or example and the word."""
        known = set(self.labels)
        for i, ex in enumerate(examples):
            for j, tag in enumerate(ex["tags"] or []):
                if tag in known and BIO.match(tag):
                    continue
                ref = _ref(where, raw[i], ex["id"], i)
                word = f"word {j + 1} ({ex['tokens'][j]!r})"
                if not BIO.match(tag):
                    raise InputError(f"{ref}: {word}: tag {tag!r} is not a BIO tag (O, B-TYPE, I-TYPE)")
                raise InputError(
                    f"{ref}: {word}: tag {tag!r} is not in the label set ({', '.join(self.labels)}); "
                    "list every tag in task.labels to use types that train does not have"
                )

    # --- model --------------------------------------------------------------------------------
    def build_model(
        self, source: ModelSource, tokenizer: Any, *, weights: bool = True, **load_kwargs: Any
    ) -> nn.Module:
        from transformers import AutoModelForTokenClassification

        return instantiate(
            AutoModelForTokenClassification,
            source,
            tokenizer=tokenizer,
            weights=weights,
            **self.label_config(),
            **load_kwargs,
        )

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """input_ids, attention mask, labels (-100 where ignored) and word_ids (-1 = special token)."""
        label_ids = {label: i for i, label in enumerate(self.labels)}
        inside = {
            i: label_ids.get("I-" + label[2:], i) if label.startswith("B-") else i for label, i in label_ids.items()
        }

        def encode(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            enc["word_ids"] = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(batch["tokens"]))]
            if all(tags is not None for tags in batch["tags"]):
                enc["labels"] = [
                    self._align(words, [label_ids[t] for t in tags], inside)
                    for words, tags in zip(enc["word_ids"], batch["tags"], strict=True)
                ]
            return dict(enc)

        return examples.map(encode, batched=True, remove_columns=examples.column_names)

    def _align(self, word_ids: list[int], tag_ids: list[int], inside: dict[int, int]) -> list[int]:
        """Sub-token labels: the word's tag on its first sub-token; -100 (or its I- tag) on the rest."""
        out, previous = [], -1
        for word in word_ids:
            if word < 0:
                out.append(-100)
            elif word != previous:
                out.append(tag_ids[word])
            else:
                out.append(inside[tag_ids[word]] if self.options.label_all_subtokens else -100)
            previous = word if word >= 0 else previous
        return out

    def collator(self, tokenizer: Any) -> Callable:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    # --- outputs ------------------------------------------------------------------------------
    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        """Each word's tag from its first sub-token; words cut off by max_length are 'O'."""
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        best = np.asarray(logits).argmax(-1)  # (examples, positions): one argmax for the whole split
        names = np.asarray(self.labels, dtype=object)
        out = []
        for ex, words, ids in zip(examples, features["word_ids"], best, strict=True):
            tags = np.full(len(ex["tokens"]), "O", dtype=object)
            positions = np.asarray(words, dtype=np.int64)
            inside = np.flatnonzero(positions >= 0)
            word, first = np.unique(positions[inside], return_index=True)  # each word's first sub-token
            tags[word] = names[ids[inside[first]]]
            tags = tags.tolist()
            covered = max(words) + 1 if words else 0
            out.append(
                {
                    "id": ex["id"],
                    "tokens": ex["tokens"],
                    "tags": ex["tags"],
                    "prediction": tags,
                    "truncated_words": len(ex["tokens"]) - covered,
                }
            )
        return out

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        return ner_metrics(
            [p["tags"] for p in predictions],
            [p["prediction"] for p in predictions],
            strict=self.options.mode == "strict",
            truncated=sum(1 for p in predictions if p.get("truncated_words", 0) > 0),
        )

    def baselines(self, train: Dataset) -> dict[str, Callable[[Dataset], list[Prediction]]]:
        """'all O' (no entity at all) and each word's most frequent tag in train ('O' when unseen)."""
        counts: dict[str, Counter] = {}
        for tokens, tags in zip(train["tokens"], train["tags"], strict=True):
            for token, tag in zip(tokens, tags, strict=True):
                counts.setdefault(token.lower(), Counter())[tag] += 1
        memory = {word: c.most_common(1)[0][0] for word, c in counts.items()}

        def predictor(tag_of: Callable[[str], str]) -> Callable[[Dataset], list[Prediction]]:
            def predict(examples: Dataset) -> list[Prediction]:
                return [
                    {"id": ex["id"], "tags": ex["tags"], "prediction": [tag_of(t) for t in ex["tokens"]]}
                    for ex in examples
                ]

            return predict

        return {
            "all O": predictor(lambda token: "O"),
            "memorised tags": predictor(lambda t: memory.get(t.lower(), "O")),
        }


def _ref(where: str, row: dict[str, Any], example_id: Any, index: int) -> str:
    """'FILE:LINE' for sentences read from CoNLL files, else the example id and row number."""
    if isinstance(row.get("where"), str) and row["where"]:
        return row["where"]
    return f"{where}: example {example_id} (row {index + 1})"


def ner_metrics(
    y_true: list[list[str]], y_pred: list[list[str]], *, strict: bool = False, truncated: int = 0
) -> dict[str, Any]:
    """Entity-level P/R/F1 (micro) and per type, and token accuracy, with seqeval."""
    from seqeval.metrics import accuracy_score, classification_report
    from seqeval.scheme import IOB2

    mode = {"mode": "strict", "scheme": IOB2} if strict else {}
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0, **mode)
    overall = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    per_type = {
        kind: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for kind, v in report.items()
        if not kind.endswith(" avg")
    }
    return {
        "f1": float(overall["f1-score"]),
        "precision": float(overall["precision"]),
        "recall": float(overall["recall"]),
        "token_accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": per_type,
        "n": len(y_true),
        "n_truncated": truncated,
    }
