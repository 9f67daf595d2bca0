"""QA post-processing speed: the vectorised n-best span search on a SQuAD-dev-sized input.

SQuAD v1.1 validation has 10,570 questions; with windows of 256 tokens and a stride of 64 about
1 in 40 needs a second window. The input here has that shape (random logits, a question block of
10-25 tokens, then the context), and is searched with n_best 20 and answers of up to 30 tokens,
the study's settings. The same search written as transformers' utils_qa loop (one window and one
candidate pair at a time) is timed on a slice and scaled, for comparison, and both must agree.

Targets: the same spans as the loop; at most 2 s for SQuAD dev on 2 CPU cores; at least 10x the loop.
Run: python benchmarks/bench_qa_postprocess.py (or `make bench`)
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from peftlab.tasks.qa_postprocess import best_spans

N_EXAMPLES, WIDTH, N_BEST, MAX_ANSWER = 10_570, 256, 20, 30
TARGET_SECONDS = 2.0


def squad_like(n_examples: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Logits, context offsets and example index of windows shaped like SQuAD dev at 256/64."""
    rng = np.random.default_rng(seed)
    windows_per_example = 1 + (rng.random(n_examples) < 0.025)
    example_index = np.repeat(np.arange(n_examples), windows_per_example)
    n = len(example_index)
    start = rng.normal(size=(n, WIDTH)).astype(np.float32)
    end = rng.normal(size=(n, WIDTH)).astype(np.float32)
    first = rng.integers(12, 28, n)[:, None]  # [CLS] question [SEP]
    last = rng.integers(100, WIDTH - 1, n)[:, None]  # context then [SEP] (and padding)
    position = np.arange(WIDTH)[None, :]
    in_context = (position >= first) & (position < last)
    offset_start = np.where(in_context, (position - first) * 6, -1)
    offset_end = np.where(in_context, (position - first) * 6 + 5, -1)
    return start, end, offset_start, offset_end, example_index


def loop_search(start, end, offset_start, offset_end, example_index, n_examples):
    """transformers' utils_qa search for SQuAD v1: Python loops over windows and candidate pairs."""
    best: dict[int, tuple[float, int, int]] = {}
    for w in range(len(start)):
        for s in np.argsort(start[w])[-1 : -N_BEST - 1 : -1]:
            for e in np.argsort(end[w])[-1 : -N_BEST - 1 : -1]:
                if offset_start[w, s] < 0 or offset_end[w, e] < 0 or e < s or e - s + 1 > MAX_ANSWER:
                    continue
                score = float(start[w, s] + end[w, e])
                if example_index[w] not in best or score > best[example_index[w]][0]:
                    best[example_index[w]] = (score, int(offset_start[w, s]), int(offset_end[w, e]))
    return [best.get(i, (-np.inf, -1, -1)) for i in range(n_examples)]


def main() -> bool:
    data = squad_like(N_EXAMPLES)
    n_windows = len(data[0])
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        spans = best_spans(*data, N_EXAMPLES, n_best=N_BEST, max_answer_length=MAX_ANSWER)
        times.append(time.perf_counter() - t0)
    vectorised = statistics.median(times)
    subset = 500  # the loop on the first 500 examples' windows, scaled to all
    cut = int(np.searchsorted(data[4], subset))
    t0 = time.perf_counter()
    reference = loop_search(*(a[:cut] for a in data), subset)
    loop = (time.perf_counter() - t0) * n_windows / cut
    agree = [(s, e) for _, s, e in reference] == list(zip(spans.start[:subset], spans.end[:subset], strict=True))
    print(f"{N_EXAMPLES:,} examples, {n_windows:,} windows of {WIDTH} tokens, n_best {N_BEST}, max answer {MAX_ANSWER}")
    print(f"vectorised: {vectorised:.3f} s (median of 5), {N_EXAMPLES / vectorised:,.0f} examples/s")
    print(f"loop (utils_qa style): {loop:.1f} s (scaled from {subset} examples), speed-up {loop / vectorised:.0f}x")
    ok = _target(f"same spans as the loop on the first {subset} examples", agree)
    ok &= _target(f"SQuAD-dev-sized search in <= {TARGET_SECONDS} s: {vectorised:.2f} s", vectorised <= TARGET_SECONDS)
    return _target(f">= 10x faster than the loop: {loop / vectorised:.0f}x", loop / vectorised >= 10) and ok


def _target(text: str, met: bool) -> bool:
    print(f"  [{'met' if met else 'MISSED'}] {text}")
    return met


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
