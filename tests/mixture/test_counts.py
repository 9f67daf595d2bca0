"""A mixture's counts without weights (peftlab.mixture.counts, for `peftlab plan`): the meta-device build
counts what the real mixture has, and the documented formula agrees with it."""

from __future__ import annotations

import json

import pytest

from peftlab.mixture.counts import mixture_counts
from peftlab.mixture.experts import read_expert
from peftlab.mixture.model import lora_config
from peftlab.mixture.settings import MixtureSpec
from peftlab.models import resolve_model
from tests.mixture.conftest import MIXTURES, Finished, tokenizer_of


@pytest.mark.parametrize("name", ["gate", "top2"])
def test_meta_counts_are_the_trained_mixtures_counts(finished: Finished, name: str) -> None:
    metrics = json.loads((finished.mixture(name) / "metrics.json").read_text())
    experts = [read_expert(finished.experts[e["name"]]) for e in metrics["experts"]]
    spec = MixtureSpec.model_validate(MIXTURES[name])
    source = resolve_model(experts[0].config["model"])
    counts = mixture_counts(
        {e.name: (e.task(), lora_config(e)) for e in experts}, source, tokenizer_of(experts[0].folder), spec
    )
    trained = metrics["params"]
    for key in ("gate", "experts", "heads", "trainable", "total", "weight_bytes"):
        assert counts[key] == trained[key], key
    assert counts["gate_formula"] == counts["gate"] and counts["layers"] == len(metrics["layers"])
