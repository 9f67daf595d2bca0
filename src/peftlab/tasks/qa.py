"""Extractive question answering in the SQuAD v1.1 format (answer = a span of the context).

Input rows carry `id`, `question`, `context` and `answers` as the hub's `squad` dataset has them
(`{text: [...], answer_start: [...]}`; a list of `{text, answer_start}` is accepted too), from the
hub, a JSONL file, or a SQuAD v1.1 JSON document (data/squad.py flattens it). Every answer is
checked against its context before anything trains: an `answer_start` that does not point at the
answer text, an empty context or question, a question that leaves no room for the context in a
window, and SQuAD v2 unanswerable questions are errors naming the file and the example id.

Long contexts are cut into overlapping windows of `data.max_length` tokens (question + context;
consecutive windows share `doc_stride` tokens), with offset mappings back to the context's
characters. A training window that does not contain the whole answer points at the start token.
Post-processing (qa_postprocess.py) picks the best span over all windows of an example; metrics
are SQuAD v1.1 exact match and F1 (qa_metrics.py), x100 like the official script.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field, PositiveInt

from peftlab.errors import InputError
from peftlab.models import ModelSource, instantiate
from peftlab.registry import TASKS
from peftlab.tasks.base import Prediction, Task, TaskOptions
from peftlab.tasks.qa_metrics import best_over_truths, exact_match_score, squad_scores
from peftlab.tasks.qa_postprocess import best_spans

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from torch import nn

NO_ANSWER = "[No answer found]"
EXPECTED_FORMAT = (
    "expected SQuAD v1.1: rows with id, question, context and answers {text: [...], answer_start: [...]} "
    "(hub `squad`, JSONL), or a SQuAD v1.1 JSON document {version, data: [{title, paragraphs: [...]}]}"
)


class QAOptions(TaskOptions):
    question_field: str = Field("question", description="the field holding the question")
    context_field: str = Field("context", description="the field holding the context passage")
    answers_field: str = Field("answers", description="the field holding the gold answers")
    doc_stride: PositiveInt = Field(64, description="tokens shared by consecutive windows of a long context")
    max_answer_length: PositiveInt = Field(30, description="longest answer considered, in tokens")
    n_best: PositiveInt = Field(20, description="start and end candidates searched per window")
    lowercase: bool = Field(False, description="lower-case questions and contexts before tokenising")


@TASKS.register("qa")
class QuestionAnswering(Task):
    """SQuAD-style extractive QA with a span (start/end) head."""

    Options = QAOptions
    # Not PEFT's QUESTION_ANS: its PeftModelForQuestionAnswering.forward (PEFT 0.21.2) takes
    # token_type_ids and never passes them on, so BERT reads every token as segment A, in training and
    # in prediction, while the same model in plain transformers gets the segments. A plain PeftModel
    # passes every input through (the span head is trained and saved as modules_to_save either way).
    peft_task_type = None
    primary_metric = "f1"
    score_scale = 100.0  # EM and F1 x100, as the SQuAD evaluation script and the study report them
    higher_is_better: ClassVar[dict[str, bool]] = {"exact_match": True, "f1": True, "loss": False}
    default_max_length = 256
    bookkeeping_columns = ("example_index", "offset_start", "offset_end")

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        from datasets import DatasetDict

        return DatasetDict({name: self._canonical(ds, f"{where} [{name}]", True) for name, ds in splits.items()})

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        return self._canonical(rows, where, labelled)

    def needs_data_to_build(self) -> bool:
        return False  # the span head has two outputs whatever the data

    def _canonical(self, ds: Dataset, where: str, labelled: bool) -> Dataset:
        o = self.options
        needed = [o.question_field, o.context_field] + ([o.answers_field] if labelled else [])
        missing = [f for f in needed if f not in ds.column_names]
        if missing:
            raise InputError(
                f"{where}: no field {', '.join(map(repr, missing))} (fields: {', '.join(ds.column_names)}); "
                f"{EXPECTED_FORMAT}; or set task.question_field / context_field / answers_field"
            )
        ids = [str(i) for i in ds["id"]] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        duplicates = [i for i, n in Counter(ids).items() if n > 1]
        if duplicates:
            raise InputError(f"{where}: duplicate example ids {', '.join(duplicates[:5])}; ids must be unique")
        questions, contexts = ds[o.question_field], ds[o.context_field]
        answers = ds[o.answers_field] if o.answers_field in ds.column_names else [None] * len(ds)
        rows = []
        for ex_id, question, context, given in zip(ids, questions, contexts, answers, strict=True):
            at = f"{where}: example {ex_id}"
            if not isinstance(context, str) or not context.strip():
                raise InputError(f"{at}: empty or missing context ('{o.context_field}')")
            if not isinstance(question, str) or not question.strip():
                raise InputError(f"{at}: empty or missing question ('{o.question_field}')")
            texts, starts = parse_answers(given, context, at)
            if labelled and not texts:
                raise InputError(
                    f"{at}: no answer; every SQuAD v1.1 question has one (SQuAD v2 unanswerable questions "
                    "are not supported)"
                )
            rows.append(
                {"id": ex_id, "question": question, "context": context, "answers": texts, "answer_starts": starts}
            )
        from datasets import Dataset

        return Dataset.from_list(rows)

    # --- model --------------------------------------------------------------------------------
    def build_model(
        self, source: ModelSource, tokenizer: Any, *, weights: bool = True, **load_kwargs: Any
    ) -> nn.Module:
        from transformers import AutoModelForQuestionAnswering

        return instantiate(AutoModelForQuestionAnswering, source, tokenizer=tokenizer, weights=weights, **load_kwargs)

    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Windows of question + context, with span labels when every example has an answer.

        Bookkeeping columns (not model inputs): example_index, and offset_start / offset_end, the
        character offsets of each token in the context (-1 outside it), padded to max_length.
        """
        self._check_window(tokenizer, max_length)
        labelled = len(examples) > 0 and all(len(a) > 0 for a in examples["answers"])

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            questions = [self._text(q.lstrip()) for q in batch["question"]]
            self._check_questions(tokenizer, questions, batch["id"], max_length)
            enc = tokenizer(
                questions,
                [self._text(c) for c in batch["context"]],
                truncation="only_second",
                max_length=max_length,
                stride=self.options.doc_stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
            sample = enc.pop("overflow_to_sample_mapping")
            offsets = enc.pop("offset_mapping")
            out = dict(enc)
            out["example_index"] = [indices[s] for s in sample]
            out["offset_start"], out["offset_end"] = [], []
            if labelled:
                out["start_positions"], out["end_positions"] = [], []
            for i, s in enumerate(sample):
                starts, ends = context_offsets(offsets[i], enc.sequence_ids(i), max_length)
                out["offset_start"].append(starts)
                out["offset_end"].append(ends)
                if labelled:
                    first_char = batch["answer_starts"][s][0]
                    span = (first_char, first_char + len(batch["answers"][s][0]))
                    cls = _cls_index(enc["input_ids"][i], tokenizer)
                    start, end = answer_tokens(np.asarray(starts), np.asarray(ends), span, cls)
                    out["start_positions"].append(start)
                    out["end_positions"].append(end)
            return out

        return examples.map(encode, batched=True, with_indices=True, remove_columns=examples.column_names)

    def _text(self, text: str) -> str:
        """Lower-cased without changing the length (offsets must still point into the original)."""
        if not self.options.lowercase:
            return text
        return "".join(low if len(low := ch.lower()) == 1 else ch for ch in text)

    def _check_window(self, tokenizer: Any, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise InputError("task qa: the model's tokenizer has no fast (Rust) version, which offset mappings need")
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        if self.options.doc_stride + specials + 1 >= max_length:
            raise InputError(
                f"task.doc_stride ({self.options.doc_stride}) leaves no room in a window of data.max_length "
                f"({max_length}) tokens; it must be below max_length - {specials + 1} (question + special tokens)"
            )

    def _check_questions(self, tokenizer: Any, questions: list[str], ids: list[str], max_length: int) -> None:
        """Each window holds the whole question, its special tokens and more than doc_stride context tokens."""
        room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - self.options.doc_stride
        lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        for ex_id, n in zip(ids, lengths, strict=True):
            if n >= room:
                raise InputError(
                    f"example {ex_id}: the question is {n} tokens; with data.max_length {max_length} and "
                    f"task.doc_stride {self.options.doc_stride} a question may have at most {room - 1} "
                    "(shorten it, or raise data.max_length)"
                )

    # --- outputs ------------------------------------------------------------------------------
    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        start_logits, end_logits = (np.asarray(x, dtype=np.float32) for x in outputs[:2])
        book = features.with_format("numpy", columns=list(self.bookkeeping_columns))
        spans = best_spans(
            start_logits,
            end_logits,
            book["offset_start"],
            book["offset_end"],
            book["example_index"],
            len(examples),
            n_best=self.options.n_best,
            max_answer_length=self.options.max_answer_length,
        )
        records = []
        for i, ex in enumerate(examples):
            found = spans.start[i] >= 0
            records.append(
                {
                    "id": ex["id"],
                    "question": ex["question"],
                    "prediction": ex["context"][spans.start[i] : spans.end[i]] if found else "",
                    "answers": ex["answers"],
                    "start": int(spans.start[i]),
                    "score": round(float(spans.score[i]), 4) if found else None,
                }
            )
        return records

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        scores = squad_scores([p["prediction"] for p in predictions], [p["answers"] for p in predictions])
        empty = sum(1 for p in predictions if not p["prediction"])
        n = len(predictions)
        return {**scores, "no_answer_pct": 100.0 * empty / n if n else 0.0, "n": n}

    # --- probes -------------------------------------------------------------------------------
    def probe_input(self, example: dict[str, Any]) -> str:
        return example["question"]

    def probe_answer(self, prediction: Prediction) -> str:
        return prediction["prediction"] or NO_ANSWER

    def probe_match(self, prediction: Prediction, expected: Any) -> bool:
        """Exact match after SQuAD normalisation, against any of the expected answers."""
        truths = [expected] if isinstance(expected, str) else [str(e) for e in expected]
        return bool(best_over_truths(exact_match_score, prediction["prediction"], truths))


def parse_answers(given: Any, context: str, at: str) -> tuple[list[str], list[int]]:
    """Gold answers as (texts, character starts), each checked against the context."""
    if given is None:
        return [], []
    if isinstance(given, dict):
        texts, starts = list(given.get("text") or []), list(given.get("answer_start") or [])
    elif isinstance(given, list) and all(isinstance(a, dict) for a in given):
        texts, starts = [a.get("text") for a in given], [a.get("answer_start") for a in given]
    else:
        raise InputError(
            f"{at}: answers must be {{text: [...], answer_start: [...]}} or a list of {{text, answer_start}}"
        )
    if len(texts) != len(starts):
        raise InputError(f"{at}: {len(texts)} answer texts but {len(starts)} answer_start values")
    for text, start in zip(texts, starts, strict=True):
        if not isinstance(text, str) or not text:
            raise InputError(f"{at}: an answer text is empty or not a string ({text!r})")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise InputError(f"{at}: answer {text!r}: answer_start must be a character index >= 0, got {start!r}")
        found = context[start : start + len(text)]
        if found != text:
            raise InputError(
                f"{at}: answer {text!r} is not at answer_start {start} of the context (it has {found!r} there)"
            )
    return texts, starts


def context_offsets(offsets: list, sequence_ids: list, width: int) -> tuple[list[int], list[int]]:
    """Character start/end of each context token (-1 for question, special and padding tokens)."""
    n = len(sequence_ids)
    in_context = np.fromiter((s == 1 for s in sequence_ids), dtype=bool, count=n)
    pairs = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    starts, ends = np.full(width, -1, dtype=np.int64), np.full(width, -1, dtype=np.int64)
    starts[:n] = np.where(in_context, pairs[:, 0], -1)
    ends[:n] = np.where(in_context, pairs[:, 1], -1)
    return starts.tolist(), ends.tolist()


def answer_tokens(starts: np.ndarray, ends: np.ndarray, span: tuple[int, int], cls: int) -> tuple[int, int]:
    """Token positions of the answer's first and last token; (cls, cls) when the window lacks it."""
    context = np.flatnonzero(starts >= 0)
    if len(context) == 0:
        return cls, cls
    first, last = context[0], context[-1]
    if starts[first] > span[0] or ends[last] < span[1]:
        return cls, cls
    token_start = first + int(np.searchsorted(starts[first : last + 1], span[0], side="right")) - 1
    token_end = first + int(np.searchsorted(ends[first : last + 1], span[1], side="left"))
    return token_start, token_end


def _cls_index(input_ids: list[int], tokenizer: Any) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0
