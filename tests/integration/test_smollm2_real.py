"""The real smollm2-135m asset: a plain Llama checkpoint (from GGUF), scored zero-shot via its chat template."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict

from peftlab import assets, engine
from peftlab.config import TrainSpec
from peftlab.methods import count_parameters
from peftlab.models import load_config, load_tokenizer, resolve_model
from peftlab.tasks import TASKS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    assets.fetch("smollm2-135m", log=lambda m: None)
    source = resolve_model("asset:smollm2-135m")
    return source, load_tokenizer(source)


def test_converted_checkpoint_is_smollm2_135m(smollm2) -> None:
    source, tokenizer = smollm2
    config, _ = load_config(source)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert config.tie_word_embeddings and "<|im_start|>" in tokenizer.chat_template
    assert assets.manifest("smollm2-135m")["hub_equivalent"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_zero_shot_scoring_through_the_chat_template(smollm2) -> None:
    source, tokenizer = smollm2
    task = TASKS.get("causal_classification")(
        prompt="Is the sentiment of this review positive or negative? Answer with one word.\n\n{text}",
        verbalizers={"negative": "negative", "positive": "positive"},
    )
    rows = Dataset.from_list(
        [
            {"id": "a", "text": "An absolute delight, I loved every minute.", "label": "positive"},
            {"id": "b", "text": "Dreadful, boring and far too long. I hated it.", "label": "negative"},
        ]
    )
    task.prepare(DatasetDict({"train": rows}), "examples")
    model = task.build_model(source, tokenizer)
    assert count_parameters(model) == (134_515_008, 134_515_008)
    features = task.predict_features(rows, tokenizer, 64)
    assert tokenizer.decode(features[0]["input_ids"]).endswith(
        "I loved every minute.<|im_end|>\n<|im_start|>assistant\n"
    )
    spec = TrainSpec(lr=1e-3, precision="fp32")
    with torch.no_grad():
        outputs, _ = engine.predict(
            model, features, task.collator(tokenizer), spec, precision="fp32", reduce=task.reduce_outputs
        )
    predictions = task.predict(outputs, rows, features)
    assert all(-30 < v < 0 for p in predictions for v in p["loglik"].values())
    assert [p["prediction"] for p in predictions] == ["positive", "negative"]
