"""The LM question-answering tasks on the real assets: SmolLM2-135M-Instruct through its chat template,
real MMLU / ARC-Easy / TriviaQA items (a handful each: the slow, real-data check of what the unit tests
check on a tiny random Llama)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from peftlab import assets
from peftlab.config import TrainSpec
from peftlab.models import load_tokenizer, resolve_model
from peftlab.tasks import TASKS

pytestmark = pytest.mark.integration
SPEC = TrainSpec(lr=1e-3, precision="fp32", eval_batch_size=8)


@pytest.fixture(scope="module")
def smollm2():
    for name in ("smollm2-135m", "arc-easy", "triviaqa"):
        assets.fetch(name, log=lambda m: None)
    source = resolve_model("asset:smollm2-135m")
    tokenizer = load_tokenizer(source)
    model = TASKS.get("lm_text")().build_model(source, tokenizer).eval()
    return model, tokenizer


def rows(asset: str, n: int) -> Dataset:
    with open(assets.ensure(asset) / "test.jsonl", encoding="utf-8") as handle:
        return Dataset.from_list([json.loads(line) for line, _ in zip(handle, range(n), strict=False)])


def test_letters_are_single_tokens_after_the_chat_template_and_scores_are_probabilities(smollm2) -> None:
    model, tokenizer = smollm2
    task = TASKS.get("lm_multiple_choice")()
    examples = task.examples_from_rows(rows("arc-easy", 8), "arc-easy test")
    features = task.predict_features(examples, tokenizer, 256)
    assert tokenizer.decode(features[0]["input_ids"]).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    outputs, _ = task.model_outputs(model, features, tokenizer, SPEC, "fp32")
    predictions = task.predict(outputs, examples, features)
    for record in predictions:  # letter log-probabilities of a real model: negative, and not all equal
        scores = record["scores"][: record["n_options"]]
        assert all(s < 0 for s in scores) and len(set(scores)) == len(scores)
    assert 0 <= task.score(predictions)["accuracy"] <= 1


def test_cloze_scoring_and_generation_run_on_real_items(smollm2) -> None:
    model, tokenizer = smollm2
    task = TASKS.get("lm_multiple_choice")(scoring="option")
    examples = task.examples_from_rows(rows("arc-easy", 4), "arc-easy test")
    features = task.predict_features(examples, tokenizer, 128)
    assert len(features) == sum(len(o) for o in examples["options"])  # one row per option
    outputs, _ = task.model_outputs(model, features, tokenizer, SPEC, "fp32")
    assert len(task.predict(outputs, examples, features)) == 4
    gen = TASKS.get("lm_generation")(max_new_tokens=8)
    questions = gen.examples_from_rows(rows("triviaqa", 4), "triviaqa test")
    prompts = gen.predict_features(questions, tokenizer, 96)
    outputs, _ = gen.model_outputs(model, prompts, tokenizer, SPEC, "fp32")
    answers = gen.predict(outputs, questions, prompts)
    assert all(isinstance(a["prediction"], str) and "\n" not in a["prediction"] for a in answers)
    assert sum(1 for a in answers if a["prediction"].strip()) >= 3  # an instruction-tuned model answers
