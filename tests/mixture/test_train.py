"""Training a mixture (peftlab.mixture.train): the seeded batch schedule over tasks, and what a step may change."""

from __future__ import annotations

import pytest
import torch

from peftlab.mixture.experts import read_expert
from peftlab.mixture.model import build_mixture
from peftlab.mixture.run import task_data
from peftlab.mixture.settings import MixtureSpec
from peftlab.mixture.train import TaskBatches, schedule, train_gate
from peftlab.models import resolve_model
from tests.mixture.conftest import Finished, tokenizer_of


def test_an_epoch_covers_every_row_of_every_task_once() -> None:
    sizes = {"a": 5, "b": 3, "c": 1}
    epochs = schedule(sizes, batch_size=2, epochs=2, seed=0)
    assert len(epochs) == 2 and [len(e) for e in epochs] == [3 + 2 + 1] * 2
    for epoch in epochs:
        for task, n in sizes.items():
            rows = sorted(i for t, batch in epoch if t == task for i in batch)
            assert rows == list(range(n)), task
        assert all(0 < len(batch) <= 2 for _, batch in epoch)
    assert epochs[0] != epochs[1]  # each epoch reshuffles


def test_the_schedule_is_seeded_and_mixes_tasks() -> None:
    sizes = {"a": 40, "b": 40}
    one = schedule(sizes, batch_size=4, epochs=1, seed=3)
    assert one == schedule(sizes, batch_size=4, epochs=1, seed=3)
    assert one != schedule(sizes, batch_size=4, epochs=1, seed=4)
    order = [task for task, _ in one[0]]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # interleaved, not task after task


@pytest.mark.parametrize(("epochs", "batches"), [(0.5, [3]), (1.5, [6, 3]), (0.01, [1])])
def test_a_fractional_epoch_keeps_its_first_steps(epochs: float, batches: list[int]) -> None:
    out = schedule({"a": 8, "b": 4}, batch_size=2, epochs=epochs, seed=0)
    assert [len(e) for e in out] == batches
    if len(out) == 1:
        assert out[0] == schedule({"a": 8, "b": 4}, batch_size=2, epochs=1, seed=0)[0][: batches[0]]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("train_experts", [False, True], ids=["frozen", "train-experts"])
def test_training_changes_only_what_may_train(finished: Finished, train_experts: bool) -> None:
    """Frozen experts: only the gate changes, the experts' LoRA matrices, heads and base stay bit-identical.
    train_experts: the LoRA matrices change too, heads and base still do not."""
    folders = [finished.experts["multiple_choice"], finished.experts["sentiment"]]
    experts = [read_expert(p) for p in folders]
    spec = MixtureSpec(
        experts="lora",
        depth=2,
        gate_size=4,
        train_experts=train_experts,
        train={"limit": 4, "batch_size": 4, "lr": 0.05},
    )
    tokenizer = tokenizer_of(folders[0])
    mixture = build_mixture(experts, spec, resolve_model(experts[0].config["model"]), tokenizer, 0)
    data = {e.name: task_data(e, spec, tokenizer, finished.base) for e in experts}
    batches = {k: TaskBatches(d.train, d.task.collator(tokenizer)) for k, d in data.items()}
    before = snapshot(mixture)
    log: list[str] = []
    result = train_gate(mixture, batches, spec.train, "fp32", log.append, "test")
    after = snapshot(mixture)
    assert result["steps"] == 2 and len(result["history"]) == 1 and len(log) == 1
    assert not mixture.training  # back in eval mode
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    gate = {k for k in before if k.startswith("gate.")}
    lora = {k for k in before if "lora_" in k}
    assert gate and lora and gate <= changed  # every gate tensor moved (the zero last map included)
    if train_experts:
        assert changed - gate <= lora and changed & lora
    else:
        assert changed == gate
    assert not any("classifier" in k or "embeddings" in k or "LayerNorm" in k for k in changed)
