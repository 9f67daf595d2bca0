"""Less padding: training batches grouped by length (seeded), prediction sorted by length with the
outputs put back in the caller's order (peftlab.engine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from peftlab.config import TrainSpec
from peftlab.engine import by_length, predict, training_arguments

LENGTHS = [9, 3, 17, 5, 12, 3, 30, 7, 21, 4, 16, 8]


def features(lengths: list[int] = LENGTHS) -> Dataset:
    rows = [[101 + i] + [7] * (n - 2) + [102] for i, n in enumerate(lengths)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def test_sorted_by_length_and_restored() -> None:
    ordered, restore = by_length(features())
    assert [len(r) for r in ordered["input_ids"]] == sorted(LENGTHS)
    outputs = np.array([r[0] for r in ordered["input_ids"]])  # one output per sorted row: its first id
    nested = (outputs, [outputs * 2, np.zeros(3)])  # a tuple of heads; an array of another size is left alone
    back = restore(nested)
    assert back[0].tolist() == [101 + i for i in range(len(LENGTHS))]
    assert back[1][0].tolist() == [2 * (101 + i) for i in range(len(LENGTHS))] and back[1][1].shape == (3,)


def test_multiple_choice_rows_count_choices_times_the_longest() -> None:
    rows = [[[1] * 10, [1] * 2], [[1] * 6, [1] * 6, [1] * 6], [[1] * 3]]  # 20, 18, 3 padded tokens
    ordered, _ = by_length(Dataset.from_dict({"input_ids": rows}))
    assert [len(r) for r in ordered["input_ids"]] == [1, 3, 2]


def test_already_sorted_features_are_not_copied() -> None:
    given = features(sorted(LENGTHS))
    ordered, restore = by_length(given)
    assert ordered is given and restore("x") == "x"


class Echo(torch.nn.Module):
    """Logits that depend on the row only (its first id and real length): any mix-up of order shows."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: object) -> dict:
        first = input_ids[:, :1].float()
        length = attention_mask.sum(-1, keepdim=True).float()
        return {"logits": torch.cat([first, length], dim=-1) + 0 * self.w}

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_predict_returns_outputs_in_the_given_order() -> None:
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0}, unk_token="[PAD]")))
    tok.pad_token = "[PAD]"
    spec = TrainSpec(batch_size=2, eval_batch_size=4, precision="fp32", lr=1e-3)
    logits, _ = predict(Echo(), features(), DataCollatorWithPadding(tok), spec, precision="fp32")
    assert logits[:, 0].tolist() == [101 + i for i in range(len(LENGTHS))]
    assert logits[:, 1].tolist() == LENGTHS


@pytest.mark.parametrize(("grouped", "strategy"), [(True, "group_by_length"), (False, "random")])
def test_training_batches_are_grouped_by_length_by_default(tmp_path: Path, grouped: bool, strategy: str) -> None:
    spec = TrainSpec(batch_size=4, precision="fp32", lr=1e-3, **({} if grouped else {"group_by_length": False}))
    args = training_arguments(spec, tmp_path, has_eval=False, precision="fp32")
    assert args.train_sampling_strategy == strategy


def test_grouped_batches_pad_less_and_are_seeded() -> None:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [int(n) for n in np.random.default_rng(0).integers(5, 60, size=256)]

    def padded(order: list[int]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in (order[k : k + 16] for k in range(0, len(order), 16)))

    def grouped(seed: int) -> list[int]:
        return list(LengthGroupedSampler(16, lengths=lengths, generator=torch.Generator().manual_seed(seed)))

    shuffled = list(torch.randperm(256, generator=torch.Generator().manual_seed(0)))
    assert grouped(0) == grouped(0) and grouped(0) != grouped(1)
    assert sorted(grouped(0)) == list(range(256))  # every example once an epoch
    assert padded(grouped(0)) < 0.8 * padded([int(i) for i in shuffled])


def test_the_trainer_groups_by_padded_tokens_and_shuffles_what_has_no_token_ids(tmp_path: Path) -> None:
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from peftlab.engine import _trainer_class

    args = training_arguments(
        TrainSpec(batch_size=2, precision="fp32", lr=1e-3), tmp_path, has_eval=False, precision="fp32"
    )
    choices = Dataset.from_dict({"input_ids": [[[1] * 10, [1] * 2], [[1] * 6, [1] * 6, [1] * 6], [[1] * 3]]})
    sampler = _trainer_class()(model=Echo(), args=args, train_dataset=choices)._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == [20, 18, 3]
    plain = Dataset.from_dict({"x": [[0.0], [1.0], [2.0]]})
    assert isinstance(
        _trainer_class()(model=Echo(), args=args, train_dataset=plain)._get_train_sampler(), RandomSampler
    )
