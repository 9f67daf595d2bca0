"""What training changed inside the model: pure tensor math, no model loading.

Each function takes weights, weight differences, representations or attention probabilities that the
caller has already extracted, and returns a number (or a small table) with a published definition:

- spectra of a weight change: effective rank (Roy & Vetterli 2007, "The effective rank: a measure of
  effective dimensionality"), stable rank, k90 (the k that holds 90% of the energy, as used by Biderman
  et al. 2024);
- how a change relates to the pre-trained weight: amplification (Hu et al. 2021, "LoRA", §7.3) and
  intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence";
  counted exactly as PEFT's `peft.tuners.lora.intruders.reduce_intruder_dimension` does);
- how two adapters relate: subspace similarity of their bases (Hu et al. 2021, §7.2);
- how representations changed: linear CKA (Kornblith et al. 2019, "Similarity of Neural Network
  Representations Revisited"), debiased with the unbiased HSIC estimator of Song et al. 2012, and cosine
  distance of pooled representations;
- how attention changed: per-head entropy (Clark et al. 2019, "What Does BERT Look At?"), mean attention
  distance (Vig & Belinkov 2019, "Analyzing the Structure of Attention in a Transformer Language Model")
  and the Jensen–Shannon divergence between two models' attention rows.

Everything runs on the CPU in float32 (half-precision inputs are upcast: SVD does not support them and
their round-off would swamp small singular values); sums that callers accumulate are float64.
"""

from __future__ import annotations

import math

import torch

# Relative tolerance for the energy threshold of `k_energy`: float32 singular values carry a relative
# error of about 1e-7, so a spectrum whose first k values hold exactly the share must still give k.
ENERGY_RTOL = 1e-5

# `amplification` treats ‖Uᵀ W V‖_F below this share of ‖W‖_F as zero: float32 projections of a W with
# nothing in ΔW's directions come out near 1e-8·‖W‖_F, not 0.
AMPLIFICATION_FLOOR = 1e-6

SUM_COUNTS = {
    "entropy": "rows",
    "entropy_norm": "rows_norm",
    "entropy_norm_no_first": "rows_no_first",
    "distance": "rows",
    "js": "rows",
}


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Detached float32 copy on the CPU: the analysis never needs gradients, and SVD needs >= float32."""
    return t.detach().to(device="cpu", dtype=torch.float32)


def _spectrum(sv: torch.Tensor) -> torch.Tensor:
    """A 1-D spectrum in float64 (the scalar measures are reductions where float64 costs nothing)."""
    if sv.dim() != 1:
        raise ValueError(f"expected a 1-D spectrum, got shape {tuple(sv.shape)}")
    return sv.detach().to(device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------------------------------


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Singular values [..., min(m, n)] in descending order, float32; batched over leading dimensions."""
    return torch.linalg.svdvals(_f32(matrices))


def effective_rank(sv: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of p_i = σ_i / Σσ.

    σ, not σ²: that is the paper's definition (a σ²-based count is the participation ratio, a different
    quantity). It reads as "how many directions the change really uses": r equal values give r, one
    dominant value gives about 1. An all-zero spectrum gives 0.0 (nothing changed).
    """
    s = _spectrum(sv)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def stable_rank(sv: torch.Tensor) -> float:
    """Σσ² / σ1²: ‖A‖_F² / ‖A‖_2², a rank surrogate that small noisy singular values barely move; 0.0 if σ1 = 0."""
    s = _spectrum(sv)
    if s.numel() == 0 or s.max() <= 0:
        return 0.0
    return float((s**2).sum() / s.max() ** 2)


def k_energy(sv: torch.Tensor, share: float = 0.9) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ share · Σσ² (k90 for share 0.9, as in Biderman et al. 2024).

    The comparison allows a relative slack of `ENERGY_RTOL` so that float round-off (in the SVD and in
    share · total) does not push a spectrum that holds exactly the share at k over to k + 1. 0 for a zero
    spectrum.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    s = _spectrum(sv)
    energy = torch.sort(s**2, descending=True).values
    total = energy.sum()
    if total <= 0:
        return 0
    threshold = share * total - ENERGY_RTOL * total
    below = int((energy.cumsum(0) < threshold).sum())  # the cumulative sum is non-decreasing
    return min(below + 1, s.numel())


# --------------------------------------------------------------------------------------------------
# A change against the pre-trained weight
# --------------------------------------------------------------------------------------------------


def amplification(
    delta: torch.Tensor, weight: torch.Tensor, r: int, *, vectors: tuple[torch.Tensor, torch.Tensor] | None = None
) -> float:
    """Hu et al. (2021) §7.3 amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F.

    U (m×r) and V (n×r) are the top-r left and right singular vectors of ΔW, so the denominator is how
    much W already does in the directions ΔW uses. A large factor means the update amplifies directions
    that W had not emphasised (Hu et al. report ≈ 21.5 for GPT-3 W_q at r = 4). nan when ΔW = 0 or W
    has nothing in those directions, up to round-off (`AMPLIFICATION_FLOOR`): the ratio is undefined.
    `vectors`: ΔW's (U, Vh) when its SVD is at hand already (weights.py computes it once per matrix).
    """
    d, w = _f32(delta), _f32(weight)
    if d.shape != w.shape or d.dim() != 2:
        raise ValueError(f"delta and weight must be matrices of one shape, got {tuple(d.shape)} and {tuple(w.shape)}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    numerator = float(torch.linalg.matrix_norm(d))
    if numerator == 0:
        return float("nan")
    if vectors is None:
        found = torch.linalg.svd(d, full_matrices=False)
        vectors = (found.U, found.Vh)
    u, vh = vectors
    r = min(r, u.shape[1])
    denominator = float(torch.linalg.matrix_norm(u[:, :r].T @ w @ vh[:r].T))
    if denominator <= AMPLIFICATION_FLOOR * float(torch.linalg.matrix_norm(w)):
        return float("nan")  # zero up to float32 round-off: the ratio would be noise, not a large factor
    return numerator / denominator


EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the ε sweep reported beside the chosen ε


def _intruder_report(
    u_tuned: torch.Tensor,
    u_base: torch.Tensor,
    delta: torch.Tensor,
    top_k: int,
    epsilon: float,
    epsilons: tuple[float, ...],
) -> dict:
    """Counts and energy for one matrix, given both left-singular bases (float32, [out, min(out, in)])."""
    # As PEFT: cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values; intruders = cos_sim[:top_k] < eps.
    max_cos = (u_tuned.T @ u_base).abs().max(dim=1).values[:top_k]
    intruding = max_cos < epsilon
    delta_energy = float((delta.double() ** 2).sum())
    energy = 0.0
    if delta_energy > 0 and bool(intruding.any()):
        directions = u_tuned[:, : max_cos.numel()][:, intruding]
        energy = float(((directions.T @ delta).double() ** 2).sum()) / delta_energy
    return {
        "count": int(intruding.sum()),
        "by_epsilon": {str(eps): int((max_cos < eps).sum()) for eps in epsilons},
        "max_cos": max_cos.tolist(),
        "energy": energy,
    }


def _left_vectors(matrices: torch.Tensor) -> torch.Tensor:
    """Left singular vectors, thin SVD (full_matrices=False, as PEFT), float32; batched."""
    return torch.linalg.svd(matrices, full_matrices=False).U


def intruders(
    base: torch.Tensor,
    tuned: torch.Tensor,
    top_k: int = 10,
    epsilon: float = 0.5,
    epsilons: tuple[float, ...] = EPSILONS,
    *,
    base_u: torch.Tensor | None = None,
) -> dict:
    """Intruder dimensions of Shuttleworth et al. (2024), counted exactly as PEFT's `reduce_intruder_dimension`.

    A top-k left singular vector of the tuned weight W = W0 + ΔW ([out, in]) is an intruder when its
    largest |cos| with every left singular vector of W0 is below `epsilon`: a new direction the
    pre-trained weight did not have, which the paper links to forgetting.

    Returns {"count": intruders at `epsilon`, "by_epsilon": {str(eps): count}, "max_cos": [top_k floats],
    "energy": share of ‖ΔW‖_F² in the intruder directions, Σ_{k∈I} ‖u_kᵀ ΔW‖² / ‖ΔW‖_F²}. The energy
    is there because in high dimension a delocalised direction has max |cos| ≈ 1/√m to any basis and
    counts as an intruder at ε = 0.5 even when it carries almost none of the change. 0.0 without
    intruders or when ΔW = 0.

    `base_u`: the base's left singular vectors (`torch.linalg.svd(W0.float(), full_matrices=False).U`),
    to reuse one base SVD across many runs.
    """
    w0, w = _f32(base), _f32(tuned)
    if w0.shape != w.shape or w.dim() != 2:
        raise ValueError(f"base and tuned must be matrices of one shape, got {tuple(w0.shape)} and {tuple(w.shape)}")
    if base_u is not None and base_u.shape[0] != w.shape[0]:
        raise ValueError(f"base_u has {base_u.shape[0]} rows, the weights have {w.shape[0]}")
    return intruders_batched(w0, w[None], top_k, epsilon, epsilons, base_u=base_u)[0]


def intruders_batched(
    base: torch.Tensor,
    tuned: torch.Tensor,
    top_k: int = 10,
    epsilon: float = 0.5,
    epsilons: tuple[float, ...] = EPSILONS,
    *,
    base_u: torch.Tensor | None = None,
) -> list[dict]:
    """`intruders` over a stack [L, out, in] of same-shaped matrices (one batched SVD); one dict per matrix.

    `base` may also be a single [out, in] matrix shared by every tuned matrix (many runs of one layer);
    `base_u` then is [out, min] or [L, out, min].
    """
    w = _f32(tuned)
    if w.dim() != 3:
        raise ValueError(f"tuned must be a stack [L, out, in], got shape {tuple(w.shape)}")
    w0 = _f32(base).expand_as(w)
    u_base = _left_vectors(_f32(base)) if base_u is None else _f32(base_u)
    u_base = u_base.expand(w.shape[0], *u_base.shape[-2:])
    u_tuned = _left_vectors(w)
    delta = w - w0
    return [_intruder_report(u_tuned[i], u_base[i], delta[i], top_k, epsilon, epsilons) for i in range(w.shape[0])]


# --------------------------------------------------------------------------------------------------
# Two adapters: subspace similarity
# --------------------------------------------------------------------------------------------------


def right_basis(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors as columns, [n, k] float32 (Vh[:k].T); k capped at min(m, n).

    For a LoRA A matrix [r, in] this is the basis Hu et al. (2021) §7.2 compare between adapters.
    """
    m = _f32(matrix)
    vh = torch.linalg.svd(m, full_matrices=False).Vh
    return vh[: min(k, vh.shape[0])].T.contiguous()


def subspace_similarity(basis1: torch.Tensor, basis2: torch.Tensor) -> torch.Tensor:
    """Hu et al. (2021) §7.2: φ[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j), i ≤ k1, j ≤ k2, for
    orthonormal bases [n, k] (float32 out); computed by `analysis.subspace.similarity_grid`."""
    from peftlab.analysis.subspace import similarity_grid

    return torch.from_numpy(similarity_grid(_f32(basis1).numpy(), _f32(basis2).numpy())).float()


# --------------------------------------------------------------------------------------------------
# Representations
# --------------------------------------------------------------------------------------------------


def _unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC of linear kernels K = XXᵀ, L = YYᵀ, in feature space (float64).

    With K̃, L̃ the kernels with zeroed diagonal:
    HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)), where
    tr(K̃L̃) = ‖XᵀY‖_F² − Σ‖x_i‖²‖y_i‖², 1ᵀK̃1 = ‖Σx_i‖² − Σ‖x_i‖², K̃1 = X(Xᵀ1) − diag(K).
    No n×n matrix is formed, so n can be thousands of tokens.
    """
    n = x.shape[0]
    kx, ky = (x * x).sum(1), (y * y).sum(1)  # diag(K), diag(L)
    trace = (x.T @ y).square().sum() - (kx * ky).sum()
    k_row = x @ x.sum(0) - kx  # K̃1
    l_row = y @ y.sum(0) - ky  # L̃1
    middle = k_row.sum() * l_row.sum() / ((n - 1) * (n - 2))
    return (trace + middle - 2.0 / (n - 2) * (k_row @ l_row)) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = True) -> float:
    """Linear CKA (Kornblith et al. 2019) between representations x [n, d1] and y [n, d2] of the same n rows.

    Invariant to orthogonal transforms and isotropic scaling of either side, so it compares what two
    models represent, not how their coordinates are laid out. The biased estimator (‖YᵀX‖_F² /
    (‖XᵀX‖_F ‖YᵀY‖_F) after centring columns) is pulled towards 1 when features outnumber rows, even
    for unrelated x and y; the default uses the unbiased HSIC of Song et al. (2012), as in the
    google-research `representation_similarity` demo, which stays near 0 there. Float64 inside.
    Debiased needs n ≥ 4. nan when a denominator is ≤ 0 (a constant representation).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be [n, d] with one n, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 rows, got {n}")
    xd = x.detach().to(device="cpu", dtype=torch.float64)
    yd = y.detach().to(device="cpu", dtype=torch.float64)
    # Centring changes nothing in the unbiased estimator (it is shift-invariant) but keeps its sums small.
    xd, yd = xd - xd.mean(0), yd - yd.mean(0)
    if debiased:
        cross, self_x, self_y = _unbiased_hsic(xd, yd), _unbiased_hsic(xd, xd), _unbiased_hsic(yd, yd)
        denominator = self_x * self_y
        return float(cross / denominator.sqrt()) if denominator > 0 else float("nan")
    cross = (yd.T @ xd).square().sum()
    denominator = torch.linalg.matrix_norm(xd.T @ xd) * torch.linalg.matrix_norm(yd.T @ yd)
    return float(cross / denominator) if denominator > 0 else float("nan")


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over rows of 1 − cos(x_i, y_i): how far pooled representations of the same examples moved.

    Unlike CKA it is not invariant to rotations, so it only makes sense between two states of one model
    (same d, same coordinates). A zero row counts as cos 0 (distance 1).
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must be [n, d] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    cos = torch.nn.functional.cosine_similarity(_f32(x).double(), _f32(y).double(), dim=1)
    return float((1.0 - cos).mean())


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def _check_attention(attn: torch.Tensor, mask: torch.Tensor) -> None:
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be [B, H, T, T], got shape {tuple(attn.shape)}")
    if mask.shape != (attn.shape[0], attn.shape[-1]):
        raise ValueError(f"mask must be [B, T] = {(attn.shape[0], attn.shape[-1])}, got {tuple(mask.shape)}")


def _valid_keys(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, Q, K] bool: key j counts for query i when both are real tokens (and j ≤ i if causal)."""
    real = mask.detach().to("cpu").bool()
    keys = real[:, None, :] & real[:, :, None]
    if causal:
        length = real.shape[1]
        keys = keys & torch.ones(length, length, dtype=torch.bool).tril()
    return keys


def _renormalised(attn: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `attn` [B, H, Q, K] restricted to `keys` [B, Q, K] and rescaled to sum 1; also their mass."""
    a = _f32(attn) * keys[:, None]
    mass = a.sum(-1)
    p = a / torch.where(mass > 0, mass, 1.0)[..., None]
    return p, mass


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Row entropies in nats (0·log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(-1)


def _row_sum(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-head float64 sum of `values` [B, H, Q] over the rows selected by `rows` [B, H, Q]."""
    return torch.where(rows, values.double(), 0.0).sum((0, 2))


def attention_stats(attn: torch.Tensor, mask: torch.Tensor, causal: bool) -> dict[str, torch.Tensor]:
    """Per-head attention entropy (Clark et al. 2019) and mean attention distance (Vig & Belinkov 2019).

    attn [B, H, T, T] holds attention probabilities; mask [B, T] is 1 for real tokens, 0 for padding (on
    either side). Only real query rows count, and each row is renormalised over its valid keys (real,
    and ≤ the query position when `causal`), so the mass a model puts on padding does not count as
    spread. Returns per-head float64 SUMS and counts, so batches can be added up and divided once with
    `finish`:

    - "entropy": Σ H(a_i) in nats;
    - "entropy_norm": Σ H(a_i) / ln(n_i) over rows with n_i ≥ 2 valid keys ("rows_norm"): 1 is uniform
      attention, whatever the row length, which makes causal rows of different lengths comparable;
    - "entropy_norm_no_first": the same after dropping the first real token and renormalising
      ("rows_no_first": rows with ≥ 2 keys left and mass on them): decoders park attention on the first
      token (a sink), which hides how spread the rest is;
    - "distance": Σ_i Σ_j a_ij |i − j| (positions as sequence indices);
    - "rows", "rows_norm", "rows_no_first": the counts.
    """
    _check_attention(attn, mask)
    keys = _valid_keys(mask, causal)
    length = keys.shape[-1]
    p, mass = _renormalised(attn, keys)
    rows = mass > 0
    n_keys = keys.sum(-1)[:, None, :].expand_as(rows)
    entropy = _entropy(p)
    rows_norm = rows & (n_keys >= 2)
    entropy_norm = entropy / torch.log(n_keys.clamp_min(2).float())

    first = mask.detach().to("cpu").int().argmax(-1)  # index of the first real token per sequence
    keep = torch.arange(length)[None, :] != first[:, None]
    keys_rest = keys & keep[:, None, :]
    p_rest, mass_rest = _renormalised(attn, keys_rest)
    n_rest = keys_rest.sum(-1)[:, None, :].expand_as(rows)
    rows_rest = rows & (n_rest >= 2) & (mass_rest > 0)
    entropy_rest = _entropy(p_rest) / torch.log(n_rest.clamp_min(2).float())

    positions = torch.arange(length, dtype=torch.float32)
    gaps = (positions[:, None] - positions[None, :]).abs()
    distance = (p * gaps).sum(-1)
    return {
        "entropy": _row_sum(entropy, rows),
        "entropy_norm": _row_sum(entropy_norm, rows_norm),
        "entropy_norm_no_first": _row_sum(entropy_rest, rows_rest),
        "distance": _row_sum(distance, rows),
        "rows": rows.sum((0, 2)).double(),
        "rows_norm": rows_norm.sum((0, 2)).double(),
        "rows_no_first": rows_rest.sum((0, 2)).double(),
    }


def attention_js(
    attn_a: torch.Tensor, attn_b: torch.Tensor, mask: torch.Tensor, causal: bool
) -> dict[str, torch.Tensor]:
    """Jensen–Shannon divergence between two models' attention rows (nats, in [0, ln 2]), summed per head.

    An adaptation of Clark et al. (2019)'s head comparisons to "how much did training move this head":
    symmetric and bounded, unlike KL, and defined when one model puts zero mass where the other does
    not. Rows are renormalised over valid keys as in `attention_stats`; a row counts when it is a real
    token with mass on valid keys in both models. Returns {"js": [H] float64 sum, "rows": [H] counts}.
    """
    _check_attention(attn_a, mask)
    if attn_a.shape != attn_b.shape:
        raise ValueError(f"attention shapes differ: {tuple(attn_a.shape)} and {tuple(attn_b.shape)}")
    keys = _valid_keys(mask, causal)
    p, mass_p = _renormalised(attn_a, keys)
    q, mass_q = _renormalised(attn_b, keys)
    m = (p + q) / 2
    xlogy = torch.special.xlogy
    js = 0.5 * (xlogy(p, p) - xlogy(p, m) + xlogy(q, q) - xlogy(q, m)).sum(-1)
    js = js.clamp(0.0, math.log(2.0))  # round-off only
    rows = (mass_p > 0) & (mass_q > 0)
    return {"js": _row_sum(js, rows), "rows": rows.sum((0, 2)).double()}


def finish(sums: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Means from accumulated sums: each sum divided by its count (see `SUM_COUNTS`), nan where the count is 0.

    Only the means come back (the count keys are consumed), as plain lists for JSON reports.
    """
    means = {}
    for name, count_name in SUM_COUNTS.items():
        if name not in sums:
            continue
        total, count = sums[name].double(), sums[count_name].double()
        means[name] = torch.where(count > 0, total / count.clamp_min(1.0), math.nan).tolist()
    return means
