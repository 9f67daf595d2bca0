"""The experiment file's `analysis:` block (light: pydantic only, so configs validate without torch).

`analysis: true` turns every part on with its defaults; `analysis: {weights: true, drift: {examples:
64}, attention: {examples: 32}}` picks parts. Off by default: it costs a pass of the base and the
tuned model over a few examples per split, and SVDs of every adapted matrix.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

PARTS = ("weights", "drift", "attention")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightsSpec(_Strict):
    """ΔW per matrix: spectra, effective rank, k90, amplification, intruder dimensions."""

    matrices: list[str] | None = Field(
        None,
        description="module names (suffixes) to look at in detail for methods that change every weight (full "
        "fine-tuning); default: the matrices LoRA adapts by default on this architecture",
    )
    top_k: PositiveInt = Field(10, description="intruder dimensions: how many top singular vectors to test")
    epsilon: float = Field(0.5, gt=0, lt=1, description="intruder dimensions: the |cos| threshold")


class PassSpec(_Strict):
    """A pass of the base and the tuned model over the same examples of each evaluated split."""

    examples: PositiveInt = Field(64, description="examples per split (the first N of a seeded shuffle)")
    batch_size: PositiveInt = 8


class DriftSpec(PassSpec):
    max_tokens: PositiveInt = Field(
        4096, description="tokens per split kept for CKA (a seeded sample of the non-padding tokens)"
    )


class AttentionSpec(PassSpec):
    examples: PositiveInt = Field(32, description="examples per split (the first N of a seeded shuffle)")


class AnalysisSpec(_Strict):
    """What `peftlab analyze` (and `analysis:` after each run) measures; each part can be off (null/false)."""

    weights: WeightsSpec | None = None
    drift: DriftSpec | None = None
    attention: AttentionSpec | None = None
    splits: list[str] | None = Field(
        None, description="which evaluated splits and extra sets to pass (default: all of evaluate.splits + extra)"
    )

    @model_validator(mode="before")
    @classmethod
    def _switches(cls, data: Any) -> Any:
        """`analysis: true` = every part with its defaults; in a mapping, `weights: true` = that part with
        its defaults, `drift: false` (or leaving it out) = off."""
        if data is True:
            return {part: {} for part in PARTS}
        if isinstance(data, dict):
            return {k: ({} if v is True else None if v is False else v) for k, v in data.items()}
        return data

    @property
    def parts(self) -> list[str]:
        return [part for part in PARTS if getattr(self, part) is not None]

    def for_examples(self, examples: int | None) -> AnalysisSpec:
        """These settings with `--examples N` applied to both passes."""
        if examples is None:
            return self
        return self.model_copy(
            update={
                part: getattr(self, part).model_copy(update={"examples": examples})
                for part in ("drift", "attention")
                if getattr(self, part) is not None
            }
        )
