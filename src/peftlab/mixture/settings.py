"""The experiment file's `mixtures:` block (pydantic only, so configs validate without torch).

A mixture is the `xlora` method: frozen LoRA experts (finished LoRA runs on one base model, one per
task) combined by a learned gate that weighs each expert per token and adapted layer (X-LoRA, Buehler &
Buehler 2024). It spans tasks, so it is not a run of one (model, task) group: it trains after the
experiment's runs, on a mix of its experts' tasks, and is scored per task beside the baselines that make
it honest (each single expert, a uniform mix, PEFT's static merges). See docs/architecture.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

FOLDER = "_mixtures"  # runs/<experiment>/_mixtures/<name>/: beside _baselines, not a run of one task
LEARNED, UNIFORM = "learned gate", "uniform mix"  # the configurations every other one is read against

Merge = Literal["linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MixtureTrain(_Strict):
    """How the gate trains (its own settings: a gate of a few thousand weights wants its own rate)."""

    epochs: PositiveFloat = 1
    lr: PositiveFloat = Field(1e-3, description="the gate's learning rate (AdamW, linear decay)")
    batch_size: PositiveInt = 16
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    limit: PositiveInt | None = Field(
        None, description="at most this many training examples per task (a seeded sample); default: all"
    )
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class MixtureEvaluate(_Strict):
    split: str = Field("test", description="the split each task is scored on (validation where a task has no test)")
    limit: PositiveInt | None = Field(
        None, description="at most this many examples per task (a seeded sample): the baselines multiply the cost"
    )
    merges: list[Merge] = Field(
        default_factory=lambda: ["linear", "svd", "ties", "dare_ties"],
        description="static merges of the experts through PEFT's add_weighted_adapter, scored as baselines",
    )
    density: float = Field(0.5, gt=0, le=1, description="share of weights kept by ties / dare / magnitude_prune merges")
    ablation: bool = Field(True, description="score the learned gate with each expert masked in turn")


class MixtureSpec(_Strict):
    """One mixture of LoRA experts (method `xlora`)."""

    method: Literal["xlora"] = "xlora"
    experts: str | list[str] = Field(
        description="the LoRA method entry whose runs (one per task of `model`) are the experts, e.g. `lora`; "
        "or a list of run names of this experiment or run folders"
    )
    model: str | None = Field(None, description="the model key whose runs are mixed (needed with several models)")
    gate: Literal["layerwise", "global"] = Field(
        "layerwise",
        description="layerwise: a small gate per adapted layer from that layer's input (one pass); global: "
        "X-LoRA's classifier on the base model's last hidden state, scalings per layer and expert (two passes)",
    )
    softmax_temperature: PositiveFloat = 1.0
    top_k: PositiveInt | None = Field(None, description="keep only the k highest-weighted experts per token")
    gate_size: PositiveInt = Field(64, description="hidden width of a gate with depth >= 2")
    depth: PositiveInt = Field(1, description="1: one linear map to the expert weights; n: n linear maps")
    train_experts: bool = Field(False, description="also train the experts' LoRA matrices (default: frozen)")
    train: MixtureTrain = Field(default_factory=MixtureTrain)
    evaluate: MixtureEvaluate = Field(default_factory=MixtureEvaluate)

    @field_validator("experts")
    @classmethod
    def _at_least_two(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) < 2:
            raise ValueError(f"a mixture needs at least two experts; got {len(value)}")
        return value
