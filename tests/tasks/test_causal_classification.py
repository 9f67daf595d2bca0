"""causal_classification on a tiny random Llama: exact log-likelihood scoring, label-only loss, prompts, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from peftlab import engine
from peftlab.config import TrainSpec, load_experiment
from peftlab.errors import InputError
from peftlab.models import load_tokenizer, resolve_model
from peftlab.tasks import TASKS
from peftlab.tasks.causal_classification import IGNORE
from tests.conftest import tiny_experiment, write_experiment

TINY_LLAMA = {
    "arch": "llama",
    "random_init": True,
    "config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
LABELS = ["negative", "neutral", "positive"]
ONE_TOKEN = {"negative": "bad", "neutral": "fine", "positive": "great"}
MULTI_TOKEN = {"negative": "bad", "neutral": "not so good", "positive": "very good"}
TEXTS = ["the movie was great today", "a boring and long day", "the show was plain", "what a terrible song"]


def tiny_llama_and_tokenizer() -> tuple:
    """The tiny random Llama (seeded, eval mode) with its tokenizer: the model every LM task test scores with."""
    source = resolve_model(TINY_LLAMA)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    return TASKS.get("lm_text")().build_model(source, tokenizer).eval(), tokenizer


def make_task(**options):
    return TASKS.get("causal_classification")(**{"prompt": "review: {text} sentiment:", **options})


@pytest.fixture(scope="module")
def llama():
    source = resolve_model(TINY_LLAMA)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = make_task(verbalizers=ONE_TOKEN).build_model(source, tokenizer)
    model.eval()
    return model, tokenizer


def examples(labels: list[str] | None = None) -> Dataset:
    labels = labels or ["positive", "negative", "neutral", "negative"]
    return Dataset.from_list(
        [{"id": str(i), "text": t, "label": label} for i, (t, label) in enumerate(zip(TEXTS, labels, strict=True))]
    )


def scored(task, model, tokenizer, max_length: int = 48) -> list[dict]:
    features = task.predict_features(examples(), tokenizer, max_length)
    spec = TrainSpec(eval_batch_size=3, precision="fp32", lr=1e-3)  # batches of 3 rows: padding in every batch
    outputs, _ = engine.predict(
        model, features, task.collator(tokenizer), spec, precision="fp32", reduce=task.reduce_outputs
    )
    return task.predict(outputs, examples(), features)


def by_hand(model, tokenizer, prompt: str, answer: str) -> list[float]:
    """log p(answer tokens | prompt), token by token, from one unpadded forward pass."""
    prompt_ids = tokenizer(prompt)["input_ids"][:-1]  # [CLS] ... without the trailing [SEP]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return [float(logprobs[len(prompt_ids) + j - 1, tok]) for j, tok in enumerate(answer_ids)]


@pytest.mark.parametrize("verbalizers", [ONE_TOKEN, MULTI_TOKEN], ids=["one-token", "multi-token"])
@pytest.mark.parametrize("score", ["sum", "mean"])
def test_scores_are_the_hand_computed_log_likelihoods(llama, verbalizers: dict, score: str) -> None:
    model, tokenizer = llama
    task = make_task(verbalizers=verbalizers, score=score)
    predictions = scored(task, model, tokenizer)
    for text, pred in zip(TEXTS, predictions, strict=True):
        for label in LABELS:
            tokens = by_hand(model, tokenizer, f"review: {text} sentiment:", verbalizers[label])
            expected = sum(tokens) / (len(tokens) if score == "mean" else 1)
            assert pred["loglik"][label] == pytest.approx(expected, abs=2e-4)
        assert pred["prediction"] == max(pred["loglik"], key=pred["loglik"].get)
        assert sum(pred["probs"].values()) == pytest.approx(1, abs=1e-4)


def test_training_rows_score_like_prompt_rows_with_one_token_verbalizers(llama) -> None:
    """The per-epoch validation metrics score featurize's rows (prompt + gold answer): same log-likelihoods."""
    model, tokenizer = llama
    task = make_task(verbalizers=ONE_TOKEN)
    expected = scored(task, model, tokenizer)
    features = task.featurize(examples(), tokenizer, 48)
    spec = TrainSpec(eval_batch_size=3, precision="fp32", lr=1e-3)
    outputs, _ = engine.predict(
        model, features, task.collator(tokenizer), spec, precision="fp32", reduce=task.reduce_outputs
    )
    again = task.predict(outputs, examples(), features)
    for a, b in zip(again, expected, strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=2e-4)
    assert task.scores_training_rows and not make_task(verbalizers=MULTI_TOKEN).scores_training_rows


def test_one_token_verbalizers_score_one_row_per_example(llama) -> None:
    _, tokenizer = llama
    one = make_task(verbalizers=ONE_TOKEN).predict_features(examples(), tokenizer, 48)
    multi = make_task(verbalizers=MULTI_TOKEN).predict_features(examples(), tokenizer, 48)
    assert len(one) == len(TEXTS) and len(multi) == len(TEXTS) * len(LABELS)


def test_training_loss_is_on_the_label_tokens_only(llama) -> None:
    model, tokenizer = llama
    task = make_task(verbalizers=MULTI_TOKEN)
    features = task.featurize(examples(), tokenizer, 48)
    for row, label in zip(features, ["positive", "negative", "neutral", "negative"], strict=True):
        answer = tokenizer(" " + MULTI_TOKEN[label], add_special_tokens=False)["input_ids"]
        assert row["labels"][-len(answer) :] == answer and row["input_ids"][-len(answer) :] == answer
        assert set(row["labels"][: -len(answer)]) == {IGNORE}
    batch = task.collator(tokenizer)([features[i] for i in range(len(features))])
    assert batch["logits_to_keep"] == batch["labels"].shape[1] == 4  # longest answer ("not so good": 3) + 1
    with torch.no_grad():
        loss = float(model(**batch).loss)
    # the mean negative log-likelihood of the gold answers' tokens, by hand
    gold = ["positive", "negative", "neutral", "negative"]
    nll = [
        -lp
        for text, label in zip(TEXTS, gold, strict=True)
        for lp in by_hand(model, tokenizer, f"review: {text} sentiment:", MULTI_TOKEN[label])
    ]
    assert loss == pytest.approx(sum(nll) / len(nll), abs=2e-4)


def test_long_texts_are_cut_but_the_prompt_and_answer_stay(llama) -> None:
    _, tokenizer = llama
    task = make_task(verbalizers=MULTI_TOKEN, prompt="review: {text} sentiment:")
    long = Dataset.from_list([{"id": "0", "text": "the movie was great " * 40, "label": "neutral"}])
    row = task.featurize(long, tokenizer, 24)[0]
    answer = tokenizer(" not so good", add_special_tokens=False)["input_ids"]
    assert len(row["input_ids"]) <= 24 and row["input_ids"][-len(answer) :] == answer
    assert tokenizer.decode(row["input_ids"][: -len(answer)]).endswith("sentiment :")


def test_chat_template_wraps_the_prompt_when_the_tokenizer_has_one() -> None:
    source = resolve_model(TINY_LLAMA)
    tokenizer = load_tokenizer(source)
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    row = make_task(verbalizers=ONE_TOKEN, system_prompt="be brief").featurize(examples(), tokenizer, 48)[0]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("[ system ] be brief [ user ] review : the movie was great today sentiment :")
    assert text.endswith("[ assistant ] great")
    plain = make_task(verbalizers=ONE_TOKEN, chat_template=False).featurize(examples(), tokenizer, 48)[0]
    assert "[ user ]" not in tokenizer.decode(plain["input_ids"])


def test_linear_head_option_trains_a_score_head(llama) -> None:
    _, tokenizer = llama
    task = make_task(verbalizers=ONE_TOKEN, head="linear")
    model = task.build_model(resolve_model(TINY_LLAMA), tokenizer)
    assert task.peft_task_type == "SEQ_CLS" and task.head_modules(model) == ["score"]
    assert make_task().head_modules(model) == []  # head: lm trains no head: the LM head is tied to the embeddings
    features = task.featurize(examples(), tokenizer, 48)
    assert features["labels"] == [2, 0, 1, 0]
    predictions = scored(task, model, tokenizer)
    assert [p["label"] for p in predictions] == ["positive", "negative", "neutral", "negative"]


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"verbalizers": {"negative": "bad", "neutral": " ", "positive": "great"}}, "empty verbalizer for label"),
        ({"verbalizers": {"negative": "bad", "neutral": "bad", "positive": "great"}}, "same verbalizer 'bad'"),
        ({"prompt": "sentiment of the review:"}, r"no \{text\} placeholder"),
        ({"labels": LABELS, "verbalizers": {"negative": "bad", "positive": "great"}}, "no verbalizer for label"),
    ],
)
def test_bad_task_options_name_the_key_and_line(tmp_path: Path, task: dict, message: str) -> None:
    exp = tiny_experiment(tmp_path, model=TINY_LLAMA, task={"name": "causal_classification", **task})
    with pytest.raises(InputError) as info:
        load_experiment(write_experiment(tmp_path, exp))
    assert any("task" in p and re.search(message, p) for p in info.value.problems), info.value.problems


def test_label_in_data_without_verbalizer_fails_before_training(tmp_path: Path) -> None:
    from peftlab.experiment import prepare

    verbalizers = {"negative": "bad", "positive": "great", "other": "fine"}
    exp = tiny_experiment(
        tmp_path, model=TINY_LLAMA, task={"name": "causal_classification", "verbalizers": verbalizers}
    )
    with pytest.raises(InputError, match=r"no verbalizer in task.verbalizers: 'neutral' \(\d+ examples\)"):
        prepare(load_experiment(write_experiment(tmp_path, exp)), log=lambda m: None)


def test_verbalizers_that_tokenize_alike_are_refused(llama) -> None:
    _, tokenizer = llama
    task = make_task(verbalizers={"negative": "bad", "neutral": "Great", "positive": "great"})  # lower-cased alike
    task.prepare(DatasetDict({"train": examples()}), "data")
    with pytest.raises(InputError, match="give the same tokens"):
        task.featurize(examples(), tokenizer, 48)


def test_early_stopping_on_a_metric_not_measured_each_epoch_fails_before_training(tmp_path: Path) -> None:
    """Multi-token verbalizers are scored on rows of their own: per-epoch accuracy does not exist."""
    from peftlab.experiment import prepare

    train = {"epochs": 2, "batch_size": 8, "precision": "fp32", "early_stopping": {"metric": "accuracy"}}
    exp = tiny_experiment(
        tmp_path, model=TINY_LLAMA, task={"name": "causal_classification", "verbalizers": MULTI_TOKEN}, train=train
    )
    with pytest.raises(InputError, match=r"'accuracy' is not measured after each epoch.*expected: loss"):
        prepare(load_experiment(write_experiment(tmp_path, exp)), log=lambda m: None)
    exp["task"]["verbalizers"] = ONE_TOKEN  # scored on the training rows: accepted
    prepare(load_experiment(write_experiment(tmp_path, exp)), log=lambda m: None)
