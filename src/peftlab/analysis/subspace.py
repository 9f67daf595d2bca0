"""Subspace similarity between two adapters (Hu et al. 2021 §7.2), in numpy only.

One implementation for both places that need it: `measures` (torch in, torch out) and the report, which
compares two runs' saved bases and must not load torch to do so.
"""

from __future__ import annotations

import numpy as np


def similarity_grid(u1: np.ndarray, u2: np.ndarray, rows: int | None = None, columns: int | None = None) -> np.ndarray:
    """φ[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) for i ≤ rows, j ≤ columns (default: all columns).

    With orthonormal columns φ lies in [0, 1]: 1 when the smaller subspace lies inside the other, 0 when
    they are orthogonal. A prefix block's squared norm is a 2-D prefix sum of the squared cross-Gram
    matrix, so the whole grid is two cumulative sums (float64)."""
    a, b = np.asarray(u1, dtype=np.float64), np.asarray(u2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"bases must be [n, k] with one n, got {a.shape} and {b.shape}")
    a, b = a[:, :rows], b[:, :columns]
    prefix = np.cumsum(np.cumsum((a.T @ b) ** 2, axis=0), axis=1)
    i, j = np.arange(1, a.shape[1] + 1), np.arange(1, b.shape[1] + 1)
    return prefix / np.minimum(i[:, None], j[None, :])
