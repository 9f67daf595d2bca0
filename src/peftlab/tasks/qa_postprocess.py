"""From start/end logits of every window to one answer span per example, vectorised with numpy.

The search is the one of transformers' `utils_qa.postprocess_qa_predictions` (and of the reference
study): in each window take the `n_best` highest start logits and the `n_best` highest end logits
(over the whole window, special and question tokens included), pair them, drop pairs that are not
inside the context, end before they start or are longer than `max_answer_length` tokens, and score
the rest by start + end logit. The best pair over all windows of an example is its answer. When no
pair survives (the model's top positions are all outside the context, typically on the start
token), the answer is empty. Ties go to the earlier window, then the higher-ranked start, then the
higher-ranked end, as in the reference implementation's stable sort.

Why not the reference code: it loops in Python over windows and n_best x n_best pairs. Here each
window's n_best x n_best candidates are one array operation over a block of windows; only the
blocks are a Python loop (to bound memory), never the tokens or the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 4096  # windows per array operation: n_best^2 x BLOCK candidates (1.6M floats at n_best 20)


@dataclass
class Spans:
    """Per example: character start and end (end exclusive) in its context, and the score.

    start == -1 marks an example without a valid span (its answer is empty, its score -inf).
    """

    start: np.ndarray
    end: np.ndarray
    score: np.ndarray


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offset_start: np.ndarray,
    offset_end: np.ndarray,
    example_index: np.ndarray,
    n_examples: int,
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> Spans:
    """The best answer span of each example over all of its windows.

    start_logits, end_logits: (windows, width) model outputs (padding positions may hold anything;
    they are outside the context). offset_start, offset_end: (windows, >= width) character offsets
    of each token in the example's context, -1 for tokens outside it (question, special, padding).
    example_index: (windows,) the example each window belongs to.
    """
    width = start_logits.shape[1]
    offset_start, offset_end = _fit_width(offset_start, width), _fit_width(offset_end, width)
    window_score = np.full(len(start_logits), -np.inf)
    window_start = np.full(len(start_logits), -1, dtype=np.int64)
    window_end = np.full(len(start_logits), -1, dtype=np.int64)
    for lo in range(0, len(start_logits), BLOCK):
        hi = lo + BLOCK
        score, s_char, e_char = _best_in_windows(
            start_logits[lo:hi], end_logits[lo:hi], offset_start[lo:hi], offset_end[lo:hi], n_best, max_answer_length
        )
        window_score[lo:hi], window_start[lo:hi], window_end[lo:hi] = score, s_char, e_char
    return _best_per_example(window_score, window_start, window_end, np.asarray(example_index), n_examples)


def _fit_width(offsets: np.ndarray, width: int) -> np.ndarray:
    """Offsets cut (or padded with -1) to the logits' width."""
    offsets = np.asarray(offsets)
    if offsets.shape[1] >= width:
        return offsets[:, :width]
    pad = np.full((offsets.shape[0], width - offsets.shape[1]), -1, dtype=offsets.dtype)
    return np.concatenate([offsets, pad], axis=1)


def _top(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits of each row, largest first; ties in position order.

    The same as a stable descending argsort cut at k, without sorting whole rows (which took 80%
    of the time): select the k largest with a partition, then sort only those k.
    """
    n, width = logits.shape
    if k >= width:
        return np.argsort(-logits, axis=1, kind="stable")
    if np.isnan(logits).any():
        logits = np.where(np.isnan(logits), -np.inf, logits)
    kth = -np.partition(-logits, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest value of each row
    above, ties = logits > kth, logits == kth
    chosen = above | ties
    crowded = np.flatnonzero(chosen.sum(axis=1) > k)  # rows where values equal to the k-th are too many
    if len(crowded):  # keep the first of them by position
        room = k - above[crowded].sum(axis=1, keepdims=True)
        chosen[crowded] = above[crowded] | (ties[crowded] & (np.cumsum(ties[crowded], axis=1) <= room))
    index = np.nonzero(chosen)[1].reshape(n, k)  # exactly k per row, in position order
    order = np.argsort(-np.take_along_axis(logits, index, axis=1), axis=1, kind="stable")
    return np.take_along_axis(index, order, axis=1)


def _best_in_windows(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offset_start: np.ndarray,
    offset_end: np.ndarray,
    n_best: int,
    max_answer_length: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best valid (score, start char, end char) of each window; (-inf, -1, -1) when none is valid."""
    k = min(n_best, start_logits.shape[1])
    rows = np.arange(len(start_logits))[:, None]
    s_idx, e_idx = _top(start_logits, k), _top(end_logits, k)  # (w, k) token positions
    s_char, e_char = offset_start[rows, s_idx], offset_end[rows, e_idx]  # (w, k)
    s_tok, e_tok = s_idx[:, :, None], e_idx[:, None, :]  # broadcast to (w, k, k): start rank x end rank
    valid = (
        (s_char[:, :, None] >= 0)
        & (e_char[:, None, :] >= 0)
        & (e_tok >= s_tok)
        & (e_tok - s_tok + 1 <= max_answer_length)
    )
    scores = start_logits[rows, s_idx][:, :, None] + end_logits[rows, e_idx][:, None, :]
    scores = np.where(valid, scores.astype(np.float64), -np.inf).reshape(len(start_logits), k * k)
    best = scores.argmax(axis=1)  # first maximum: the higher-ranked start, then end
    score = scores[rows[:, 0], best]
    found = np.isfinite(score)
    start = np.where(found, s_char[rows[:, 0], best // k], -1)
    end = np.where(found, e_char[rows[:, 0], best % k], -1)
    return score, start, end


def _best_per_example(
    score: np.ndarray, start: np.ndarray, end: np.ndarray, example_index: np.ndarray, n_examples: int
) -> Spans:
    """The best window of each example (the earliest among equal scores)."""
    order = np.lexsort((np.arange(len(score)), -score, example_index))  # by example, score desc, window
    first = order[np.r_[True, example_index[order][1:] != example_index[order][:-1]]] if len(order) else order
    out = Spans(
        start=np.full(n_examples, -1, dtype=np.int64),
        end=np.full(n_examples, -1, dtype=np.int64),
        score=np.full(n_examples, -np.inf),
    )
    ex = example_index[first]
    out.start[ex], out.end[ex], out.score[ex] = start[first], end[first], score[first]
    return out
