"""What training did to the representations and to attention: the base and the tuned backbone run on
the same examples, layer by layer.

- Drift: linear CKA (Kornblith et al. 2019, debiased) between the two models' hidden states of every
  layer, over the non-padding tokens (a seeded sample of at most `max_tokens`), and the cosine distance
  of each example's mean-pooled representation.
- Attention: per layer and head, entropy (raw, normalised by the log of the row's length, and without
  the first token, which collects attention in decoders), mean attention distance (Vig & Belinkov 2019),
  and the Jensen-Shannon divergence between the two models' rows. SDPA returns no attention weights,
  so both models switch to eager attention for this pass only.

Only the backbone runs (the task head is skipped): the question is what changed inside the pretrained
model, and a language model's head over a 50k vocabulary would cost more than the rest of the pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from peftlab.analysis import measures
from peftlab.methods.base import backbone_of

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from torch import nn

    from peftlab.analysis.settings import AttentionSpec, DriftSpec

# The inputs a transformers backbone takes; a task's batch carries more (labels, positions of answers).
BACKBONE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def backbone_batches(features: Dataset, collator: Callable, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of the backbone's inputs, flattened to [rows, seq] (multiple-choice batches are
    [examples, choices, seq]: each choice is one row, as the task model feeds them)."""
    rows = [features[i] for i in range(len(features))]
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        yield {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if k in BACKBONE_INPUTS}


@contextmanager
def eager_attention(*models: nn.Module) -> Iterator[None]:
    """Eager attention (which returns its weights) for the duration, then each model's own again."""
    before = []
    for model in models:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        before.append((inner, inner.config._attn_implementation))
        inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        for inner, name in before:
            inner.set_attn_implementation(name)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], attentions: bool) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    _, backbone = backbone_of(inner)
    return backbone(**batch, output_hidden_states=True, output_attentions=attentions, return_dict=True)


def is_causal(attention: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether attention rows see only earlier tokens: every weight above the diagonal between real
    tokens is exactly 0 (a decoder's mask gives -inf there). Read off the weights themselves, so no
    list of architectures can go stale. attention [B, H, S, S], mask [B, S]."""
    import torch

    real = mask.bool()
    above = torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool, device=mask.device).triu(1)
    pairs = (real[:, :, None] & real[:, None, :] & above)[:, None].expand_as(attention)
    return bool((attention[pairs] == 0).all())


def drift(
    base: nn.Module, tuned: nn.Module, features: Dataset, collator: Callable, spec: DriftSpec, seed: int = 0
) -> dict[str, Any]:
    """CKA and pooled cosine distance per layer (embeddings first) between the base and tuned model."""
    import torch

    base_states: list[list[torch.Tensor]] = []
    tuned_states: list[list[torch.Tensor]] = []
    pooled_base: list[list[torch.Tensor]] = []
    pooled_tuned: list[list[torch.Tensor]] = []
    tokens = 0
    with torch.no_grad():
        for batch in backbone_batches(features, collator, spec.batch_size):
            mask = batch["attention_mask"].bool()
            tokens += int(mask.sum())
            for states, pooled, model in ((base_states, pooled_base, base), (tuned_states, pooled_tuned, tuned)):
                hidden = _forward(model, batch, attentions=False).hidden_states
                if not states:
                    states.extend([] for _ in hidden)
                    pooled.extend([] for _ in hidden)
                for layer, h in enumerate(hidden):
                    h = h.float()
                    states[layer].append(h[mask])
                    pooled[layer].append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
    keep = _token_sample(tokens, spec.max_tokens, seed)
    cka, distance = [], []
    for layer in range(len(base_states)):
        x = torch.cat(base_states[layer])[keep]
        y = torch.cat(tuned_states[layer])[keep]
        cka.append(measures.linear_cka(x, y, debiased=True))
        distance.append(measures.cosine_distance(torch.cat(pooled_base[layer]), torch.cat(pooled_tuned[layer])))
    return {
        "n": len(features),
        "tokens": len(keep),
        "layers": ["embeddings", *[str(i) for i in range(1, len(cka))]],
        "cka": cka,
        "cosine_distance": distance,
    }


def _token_sample(total: int, limit: int, seed: int) -> torch.Tensor:
    import torch

    if total <= limit:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:limit].sort().values


def attention(
    base: nn.Module, tuned: nn.Module, features: Dataset, collator: Callable, spec: AttentionSpec
) -> dict[str, Any]:
    """Attention entropy, distance and base-vs-tuned JS divergence per layer and head."""
    import torch

    causal: bool | None = None
    sums: dict[str, list[dict[str, torch.Tensor]]] = {"base": [], "tuned": [], "js": []}
    with torch.no_grad(), eager_attention(base, tuned):
        for batch in backbone_batches(features, collator, spec.batch_size):
            mask = batch["attention_mask"]
            first = _forward(base, batch, attentions=True).attentions
            second = _forward(tuned, batch, attentions=True).attentions
            if causal is None:
                causal = is_causal(first[0], mask)
            for layer, (a, b) in enumerate(zip(first, second, strict=True)):
                _accumulate(sums["base"], layer, measures.attention_stats(a.float(), mask, causal))
                _accumulate(sums["tuned"], layer, measures.attention_stats(b.float(), mask, causal))
                _accumulate(sums["js"], layer, measures.attention_js(a.float(), b.float(), mask, causal))
    base_layers = [measures.finish(s) for s in sums["base"]]
    tuned_layers = [measures.finish(s) for s in sums["tuned"]]
    js_layers = [measures.finish(s)["js"] for s in sums["js"]]
    out: dict[str, Any] = {
        "n": len(features),
        "rows": int(sums["js"][0]["rows"][0]) if sums["js"] else 0,
        "layers": len(js_layers),
        "heads": len(js_layers[0]) if js_layers else 0,
        "causal": bool(causal),
        "js": js_layers,
    }
    for key in ("entropy", "entropy_norm", "entropy_norm_no_first", "distance"):
        out[key] = {"base": [s[key] for s in base_layers], "tuned": [s[key] for s in tuned_layers]}
    return out


def _accumulate(into: list[dict[str, torch.Tensor]], layer: int, sums: dict[str, torch.Tensor]) -> None:
    if len(into) <= layer:
        into.append({k: v.clone() for k, v in sums.items()})
    else:
        for key, value in sums.items():
            into[layer][key] += value
