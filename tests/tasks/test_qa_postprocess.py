"""The vectorised n-best span search: hand-made cases, and equality with a per-window reference loop."""

from __future__ import annotations

import numpy as np
import pytest

from peftlab.tasks.qa_postprocess import best_spans

# One window: [CLS] q q [SEP] c0 c1 c2 [SEP]; context "alpha beta gamma" -> c0 (0,5) c1 (6,10) c2 (11,16)
OFF_START = np.array([[-1, -1, -1, -1, 0, 6, 11, -1]])
OFF_END = np.array([[-1, -1, -1, -1, 5, 10, 16, -1]])


def logits(*peaks: tuple[int, float], width: int = 8) -> np.ndarray:
    row = np.zeros((1, width))
    for position, value in peaks:
        row[0, position] = value
    return row


def test_best_pair_inside_the_context() -> None:
    spans = best_spans(logits((5, 3.0)), logits((6, 2.0)), OFF_START, OFF_END, np.array([0]), 1)
    assert (spans.start[0], spans.end[0]) == (6, 16)  # "beta gamma"
    assert spans.score[0] == pytest.approx(5.0)


def test_end_before_start_and_too_long_spans_are_skipped() -> None:
    # best start c2, best end c0 (invalid: ends before it starts); next best end is c2 -> "gamma"
    start, end = logits((6, 4.0), (4, 1.0)), logits((4, 5.0), (6, 3.0))
    spans = best_spans(start, end, OFF_START, OFF_END, np.array([0]), 1)
    assert (spans.start[0], spans.end[0]) == (11, 16)
    # c0..c2 (score 10) is 3 tokens: with max_answer_length 2 the best valid pair is c1..c2 (score 0 + 9)
    spans = best_spans(logits((4, 1.0)), logits((6, 9.0)), OFF_START, OFF_END, np.array([0]), 1, max_answer_length=2)
    assert (spans.start[0], spans.end[0], spans.score[0]) == (6, 16, 9.0)


def test_no_valid_span_gives_an_empty_answer() -> None:
    # with n_best 1 the only candidates are the start token (outside the context): no answer
    spans = best_spans(logits((0, 9.0)), logits((0, 9.0)), OFF_START, OFF_END, np.array([0]), 1, n_best=1)
    assert spans.start[0] == -1 and spans.end[0] == -1 and spans.score[0] == -np.inf
    # with n_best 2 the runner-up positions inside the context are considered
    spans = best_spans(
        logits((0, 9.0), (5, 1.0)), logits((0, 9.0), (5, 1.0)), OFF_START, OFF_END, np.array([0]), 1, n_best=2
    )
    assert (spans.start[0], spans.end[0]) == (6, 10)


def test_best_window_of_an_example_wins_and_examples_stay_apart() -> None:
    # example 0 has windows 0 and 1; example 1 has window 2 (its logits are padded narrower: -100)
    off_s = np.repeat(OFF_START, 3, axis=0)
    off_e = np.repeat(OFF_END, 3, axis=0)
    start = np.vstack([logits((4, 1.0)), logits((5, 2.0)), logits((6, 1.0))])
    end = np.vstack([logits((4, 1.0)), logits((5, 2.0)), logits((6, 1.0))])
    spans = best_spans(start, end, off_s, off_e, np.array([0, 0, 1]), 3)
    assert spans.start.tolist() == [6, 11, -1] and spans.end.tolist() == [10, 16, -1]  # example 2: no window
    assert spans.score.tolist()[:2] == [4.0, 2.0]


def test_offsets_wider_than_the_logits_are_cut() -> None:
    spans = best_spans(logits((4, 1.0), width=6), logits((4, 1.0), width=6), OFF_START, OFF_END, np.array([0]), 1)
    assert (spans.start[0], spans.end[0]) == (0, 5)


def reference(start, end, off_s, off_e, example_index, n_examples, n_best, max_len):
    """transformers' utils_qa search, one window and one candidate pair at a time."""
    best = {}
    for w in range(len(start)):
        s_top = np.argsort(-start[w], kind="stable")[:n_best]
        e_top = np.argsort(-end[w], kind="stable")[:n_best]
        for s in s_top:
            for e in e_top:
                if off_s[w, s] < 0 or off_e[w, e] < 0 or e < s or e - s + 1 > max_len:
                    continue
                score = start[w, s] + end[w, e]
                ex = example_index[w]
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, off_s[w, s], off_e[w, e])
    out = [best.get(i, (-np.inf, -1, -1)) for i in range(n_examples)]
    return [o[1] for o in out], [o[2] for o in out], [o[0] for o in out]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_reference_loop_on_random_windows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_windows, width = 300, 40
    example_index = np.sort(rng.integers(0, 120, n_windows))
    start = rng.normal(size=(n_windows, width)).astype(np.float32)
    end = rng.normal(size=(n_windows, width)).astype(np.float32)
    context = np.zeros((n_windows, width), dtype=bool)
    for w in range(n_windows):  # a context block after a question, sometimes very short
        first = rng.integers(2, 12)
        context[w, first : rng.integers(first + 1, width)] = True
    off_s = np.where(context, np.arange(width) * 5, -1)
    off_e = np.where(context, np.arange(width) * 5 + 4, -1)
    n_examples = int(example_index.max()) + 2  # the last example has no window
    spans = best_spans(start, end, off_s, off_e, example_index, n_examples, n_best=5, max_answer_length=4)
    ref_start, ref_end, ref_score = reference(start, end, off_s, off_e, example_index, n_examples, 5, 4)
    assert spans.start.tolist() == ref_start and spans.end.tolist() == ref_end
    np.testing.assert_allclose(spans.score, np.asarray(ref_score, dtype=np.float64), rtol=1e-6)
    assert (spans.start == -1).sum() >= 1


def test_top_k_equals_a_stable_descending_sort_with_ties_and_nan() -> None:
    from peftlab.tasks.qa_postprocess import _top

    rng = np.random.default_rng(0)
    for trial in range(200):
        width, k = int(rng.integers(1, 40)), int(rng.integers(1, 45))
        x = rng.integers(-3, 3, size=(int(rng.integers(1, 20)), width)).astype(np.float32)  # many ties
        if trial % 2:
            x[0, 0] = np.nan  # treated as -inf
        expected = np.argsort(-np.where(np.isnan(x), -np.inf, x), axis=1, kind="stable")[:, :k]
        assert np.array_equal(_top(x, k), expected)
