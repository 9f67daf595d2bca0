"""Batched greedy generation (engine.generate) against one example at a time, in generated tokens per second.

Why: lm_generation evaluates by generating, one forward pass per new token; on one example at a time
each pass reads every weight for a single token, so batching prompts is most of evaluation speed.
Model: SmolLM2-135M-Instruct (asset smollm2-135m), else a random Llama of its shape (said so below).
Prompts: 32 real TriviaQA questions (asset triviaqa, else fixed questions) in lm_generation's default
prompt and the model's chat template. Each prompt gets exactly 16 new tokens (the end token is held
back until then), so both ways generate the same number of tokens and tokens/s compare like for like;
a second, informative line lets rows stop at the end token or a line break as evaluation does and
counts only the tokens really generated. Target: batch 16 at least 5x the one-at-a-time loop (fp32).

Also the cost per question of lm_multiple_choice's two scorings on 32 real MMLU test questions (asset
mmlu, general subjects): letter (one forward pass per question) against option (one per option).
Information, with one target: letter scoring is cheaper per question than option scoring.
"""

from __future__ import annotations

import json
import time

import torch

from peftlab import assets, engine
from peftlab.models import resolve_model
from peftlab.tasks import TASKS
from peftlab.tasks.lm_generation import end_tokens, newline_stop

N_PROMPTS, NEW_TOKENS, BATCH, TARGET = 32, 16, 16, 5.0
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
FIXED_QUESTIONS = [
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the capital city of Australia?",
    "In which year did the Berlin Wall fall?",
    "What is the chemical symbol for gold?",
    "Which ocean is the largest on Earth?",
    "Who wrote the novel Pride and Prejudice?",
    "How many strings does a standard violin have?",
]


def _asset(name: str) -> object | None:
    """The asset's folder, or None when it is not cached and cannot be fetched (offline)."""
    try:
        return assets.ensure(name, log=lambda _: None)
    except Exception as exc:  # a benchmark falls back rather than fail on a missing asset
        print(f"  asset {name} unavailable ({type(exc).__name__}); falling back")
        return None


def _model() -> tuple[torch.nn.Module, object, str]:
    task = TASKS.get("lm_generation")()
    folder = _asset("smollm2-135m")
    spec = (
        str(folder / "model") if folder is not None else {"arch": "llama", "random_init": True, "config": SMOLLM2_SHAPE}
    )
    source = resolve_model(spec)
    from peftlab.models import load_tokenizer

    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = task.build_model(source, tokenizer)
    what = "SmolLM2-135M-Instruct" if folder is not None else "a RANDOM Llama of SmolLM2-135M's shape (asset missing)"
    return model.eval(), tokenizer, what


def _questions() -> tuple[list[str], str]:
    folder = _asset("triviaqa")
    if folder is None:
        return (FIXED_QUESTIONS * (N_PROMPTS // len(FIXED_QUESTIONS) + 1))[:N_PROMPTS], "fixed questions"
    with open(folder / "validation.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(N_PROMPTS), strict=False)]
    return [row["question"] for row in rows], "TriviaQA validation questions"


def _run(model, prompts, tokenizer, batch_size: int, *, forced: bool, tokens: int = NEW_TOKENS) -> tuple[int, float]:
    """(tokens generated, seconds) for all prompts in batches of `batch_size` (forced: exactly `tokens` each)."""
    ids, seconds = engine.generate(
        model,
        prompts,
        pad_id=tokenizer.pad_token_id,
        eos_ids=end_tokens(tokenizer, model),
        max_new_tokens=tokens,
        batch_size=batch_size,
        min_new_tokens=tokens if forced else 0,
        stop=None if forced else newline_stop(tokenizer),
    )
    return sum(len(row) for row in ids), seconds


def main() -> bool:
    model, tokenizer, what = _model()
    questions, source = _questions()
    fmt = TASKS.get("lm_generation")().prompt_format(tokenizer)
    prompts = [fmt.encode({"question": q}) for q in questions]
    lengths = sorted(len(p) for p in prompts)
    print(f"model: {what}; {len(prompts)} {source}, prompts {lengths[0]}-{lengths[-1]} tokens, fp32")
    print(f"torch threads: {torch.get_num_threads()}")
    _run(model, prompts[:2], tokenizer, 2, forced=True)  # warm-up (allocator, thread pools)
    ratios = {}
    for forced in (True, False):
        label = f"exactly {NEW_TOKENS} new tokens" if forced else "stops at end token / line break"
        loop_tokens, loop_s = _run(model, prompts, tokenizer, 1, forced=forced)
        batch_tokens, batch_s = _run(model, prompts, tokenizer, BATCH, forced=forced)
        loop_rate, batch_rate = loop_tokens / loop_s, batch_tokens / batch_s
        ratios[forced] = batch_rate / loop_rate
        print(
            f"{label:<34} one at a time: {loop_tokens} tokens in {loop_s:.2f}s = {loop_rate:.1f} tok/s; "
            f"batch {BATCH}: {batch_tokens} tokens in {batch_s:.2f}s = {batch_rate:.1f} tok/s; "
            f"{ratios[forced]:.2f}x"
        )
    _prefill_and_decode(model, prompts, tokenizer)
    generation = _target(
        f"batch {BATCH} >= {TARGET:g}x one at a time ({NEW_TOKENS} tokens each): {ratios[True]:.2f}x",
        ratios[True] >= TARGET,
    )
    return _scoring_cost(model, tokenizer) and generation


def _prefill_and_decode(model: torch.nn.Module, prompts: list, tokenizer: object) -> None:
    """Where the time goes: reading the prompts (one new token) against each further token.

    Batching helps decoding most (one pass reads every weight for 16 rows instead of 1); reading the
    prompts is already many tokens per pass, so it gains little, and bounds the overall ratio."""
    timings = {}
    for batch in (1, BATCH):
        _, prefill = _run(model, prompts, tokenizer, batch, forced=True, tokens=1)
        _, whole = _run(model, prompts, tokenizer, batch, forced=True)
        per_token = (whole - prefill) / (NEW_TOKENS - 1)
        timings[batch] = (prefill, per_token)
        print(
            f"  batch {batch:>2}: prompts read in {prefill:.2f}s; each further token for all {len(prompts)} "
            f"questions {per_token:.2f}s"
        )
    (p1, d1), (pb, db) = timings[1], timings[BATCH]
    print(f"  batching speeds reading the prompts {p1 / pb:.2f}x and each further token {d1 / db:.2f}x")


def _scoring_cost(model: torch.nn.Module, tokenizer: object) -> bool:
    """Seconds per question of letter and option scoring (lm_multiple_choice), batches of 16 rows."""
    from datasets import Dataset

    from peftlab.config import TrainSpec

    folder = _asset("mmlu")
    if folder is None:
        print("  multiple-choice scoring: skipped (no mmlu asset)")
        return True
    with open(folder / "test.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    general = [r for r in rows if r["subject"].startswith("high_school")][:N_PROMPTS]
    spec = TrainSpec(eval_batch_size=BATCH, precision="fp32", lr=1e-4)
    per_question = {}
    for scoring in ("letter", "option"):
        task = TASKS.get("lm_multiple_choice")(scoring=scoring)
        examples = task.examples_from_rows(Dataset.from_list(general), "mmlu test")
        features = task.predict_features(examples, tokenizer, 512)
        outputs, seconds = task.model_outputs(model, features, tokenizer, spec, "fp32")
        accuracy = task.score(task.predict(outputs, examples, features))["accuracy"]
        per_question[scoring] = seconds / len(examples)
        print(
            f"multiple choice, {scoring} scoring: {len(features)} rows for {len(examples)} questions in "
            f"{seconds:.2f}s = {1000 * per_question[scoring]:.0f} ms per question (accuracy {accuracy:.3f})"
        )
    ratio = per_question["option"] / per_question["letter"]
    return _target(
        f"letter scoring cheaper per question than option scoring: {ratio:.1f}x",
        per_question["letter"] < per_question["option"],
    )


def _target(text: str, met: bool) -> bool:
    print(f"  [{'met' if met else 'MISSED'}] {text}")
    return met


if __name__ == "__main__":
    start = time.perf_counter()
    ok = main()
    print(f"({time.perf_counter() - start:.0f}s)")
    raise SystemExit(0 if ok else 1)
