"""Plain text scored (or trained on) by a causal LM: mean per-token cross-entropy.

This is PEFT's forgetting measure (`method_comparison/`, MetaMathQA): the mean per-token
cross-entropy of general text (Wikipedia paragraphs) after training minus before. As a task it
also trains: next-token training on every token of the text (continued pre-training).

Every token after the first is predicted and counted; the cross-entropy is pooled over tokens (the
sum of their negative log-likelihoods over their count), so a long paragraph weighs more than a
short one, as in a language model's own loss. Identical texts are kept once (`unique`): SQuAD rows
repeat each paragraph for every question asked about it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from peftlab.errors import InputError
from peftlab.registry import TASKS
from peftlab.tasks.base import Prediction, TaskOptions
from peftlab.tasks.lm_prompt import CausalLmTask

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict

TEXT_FIELDS = ("text", "context", "passage", "document")


class LmTextOptions(TaskOptions):
    text_field: str | None = Field(None, description="the text; default: text, context, passage or document")
    unique: bool = Field(True, description="keep each distinct text once (SQuAD repeats a paragraph per question)")
    min_tokens: int = Field(2, ge=2, description="texts shorter than this many tokens are an error")


@TASKS.register("lm_text")
class LmText(CausalLmTask):
    """Per-token cross-entropy of text under a causal LM (lower is better)."""

    Options = LmTextOptions
    options: LmTextOptions
    primary_metric = "cross_entropy"
    higher_is_better: ClassVar[dict[str, bool]] = {"cross_entropy": False, "perplexity": False}
    headline_metrics = ("cross_entropy",)
    default_max_length = 256

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, splits: DatasetDict, where: str) -> DatasetDict:
        from datasets import DatasetDict

        return DatasetDict({name: self._canonical(ds, f"{where} [{name}]") for name, ds in splits.items()})

    def examples_from_rows(self, rows: Dataset, where: str, labelled: bool = True) -> Dataset:
        return self._canonical(rows, where)

    def _canonical(self, ds: Dataset, where: str) -> Dataset:
        from datasets import Dataset

        field = self._field(ds, where)
        ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        rows, seen = [], set()
        for i, (key, text) in enumerate(zip(ids, ds[field], strict=True)):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{where}: example {key} (row {i + 1}): empty or missing text in field '{field}'")
            if self.options.unique and text in seen:
                continue
            seen.add(text)
            rows.append({"id": str(key), "text": text})
        return Dataset.from_list(rows) if rows else Dataset.from_dict({"id": [], "text": []})

    def _field(self, ds: Dataset, where: str) -> str:
        cols = ds.column_names
        given = self.options.text_field
        if given is not None:
            if given not in cols:
                raise InputError(f"{where}: no field '{given}' (task.text_field); fields: {', '.join(cols)}")
            return given
        found = next((f for f in TEXT_FIELDS if f in cols), None)
        if found is None:
            raise InputError(
                f"{where}: no {' or '.join(map(repr, TEXT_FIELDS))} field (fields: {', '.join(cols)}); "
                "set task.text_field"
            )
        return found

    # --- features -----------------------------------------------------------------------------
    def featurize(self, examples: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Each text's first `max_length` tokens; every token after the first is a label."""
        from peftlab.tasks.causal_classification import IGNORE

        minimum = self.options.min_tokens

        def rows(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": []}
            for key, text in zip(batch["id"], batch["text"], strict=True):
                ids = tokenizer(text)["input_ids"][:max_length]
                if len(ids) < minimum:
                    raise InputError(f"example {key}: {len(ids)} token(s); task.min_tokens asks for {minimum}")
                out["input_ids"].append(ids)
                out["labels"].append([IGNORE, *ids[1:]])  # the first token has nothing before it to predict it
            return out

        return examples.map(rows, batched=True, remove_columns=examples.column_names)

    # --- outputs ------------------------------------------------------------------------------
    def reduce_outputs(self, logits: Any, labels: Any) -> torch.Tensor:  # type: ignore[override]
        """Per row: (sum of the tokens' negative log-likelihoods, number of predicted tokens)."""
        import torch

        from peftlab.tasks.causal_classification import IGNORE, answer_logprob

        logits = logits[0] if isinstance(logits, tuple) else logits
        total = -answer_logprob(logits, labels)
        count = (labels[:, -logits.shape[1] :][:, 1:] != IGNORE).sum(dim=1).to(total.device)
        return torch.stack([total, count.to(total.dtype)], dim=1)

    def predict(self, outputs: Any, examples: Dataset, features: Dataset) -> list[Prediction]:
        import numpy as np

        values = np.asarray(outputs, dtype=np.float64).reshape(len(examples), 2)
        return [
            {"id": key, "nll": round(float(nll), 5), "tokens": int(count), "prediction": round(float(nll / count), 5)}
            for key, (nll, count) in zip(examples["id"], values, strict=True)
        ]

    def score(self, predictions: list[Prediction]) -> dict[str, Any]:
        nll = sum(p["nll"] for p in predictions)
        tokens = sum(p["tokens"] for p in predictions)
        entropy = nll / tokens if tokens else float("nan")
        return {
            "cross_entropy": entropy,
            "perplexity": math.exp(entropy) if tokens else float("nan"),
            "tokens": tokens,
            "n": len(predictions),
        }

    def probe_input(self, example: dict[str, Any]) -> str:
        return str(example.get("text", ""))[:80]
