"""The analysis measures against values that hold by construction, and intruders against PEFT itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftlab.analysis.measures import (
    amplification,
    attention_js,
    attention_stats,
    cosine_distance,
    effective_rank,
    finish,
    intruders,
    intruders_batched,
    k_energy,
    linear_cka,
    right_basis,
    singular_values,
    stable_rank,
    subspace_similarity,
)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Orthonormal columns [rows, cols] from the QR of a seeded Gaussian matrix."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q.float()


def rank2(s1: float, s2: float) -> torch.Tensor:
    u, v = orthonormal(16, 2, 0), orthonormal(12, 2, 1)
    return u @ torch.diag(torch.tensor([s1, s2])) @ v.T


# -- spectra ----------------------------------------------------------------------------------------


def test_rank2_spectrum_measures() -> None:
    sv = singular_values(rank2(3.0, 1.0))
    assert sv.dtype == torch.float32
    assert sv.shape == (12,)
    assert sv[:2].tolist() == pytest.approx([3.0, 1.0], abs=1e-5)
    assert sv[2:].abs().max() < 1e-5
    assert effective_rank(sv) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), abs=1e-5)
    assert stable_rank(sv) == pytest.approx(10 / 9, abs=1e-5)
    assert k_energy(sv, 0.9) == 1  # 9/10 is exactly 0.9: round-off must not push it to 2
    assert k_energy(torch.tensor([3.0, 1.0]), 0.9) == 1
    assert k_energy(sv, 0.95) == 2


def test_k_energy_holds_an_exact_share_at_k() -> None:
    # 16 + 2 = 18 of 20 = 90% exactly in the first two values
    assert k_energy(torch.tensor([4.0, math.sqrt(2.0), math.sqrt(2.0)]), 0.9) == 2
    assert k_energy(torch.tensor([4.0, math.sqrt(2.0), math.sqrt(2.0)]), 0.91) == 3


def test_equal_singular_values() -> None:
    sv = singular_values(rank2(2.0, 2.0))
    assert effective_rank(sv) == pytest.approx(2.0, abs=1e-4)
    assert stable_rank(sv) == pytest.approx(2.0, abs=1e-5)
    assert k_energy(sv, 0.9) == 2


def test_singular_values_batched_and_upcast() -> None:
    stack = torch.stack([rank2(3.0, 1.0), rank2(2.0, 2.0)]).to(torch.bfloat16)
    sv = singular_values(stack)
    assert sv.shape == (2, 12) and sv.dtype == torch.float32
    assert sv[1, :2].tolist() == pytest.approx([2.0, 2.0], abs=2e-2)


def test_zero_matrix() -> None:
    w0 = torch.zeros(16, 12)
    sv = singular_values(w0)
    assert effective_rank(sv) == 0.0
    assert stable_rank(sv) == 0.0
    assert k_energy(sv) == 0
    result = intruders(w0, w0)
    assert result["count"] == 0
    assert result["energy"] == 0.0
    assert math.isnan(amplification(w0, torch.randn(16, 12), 2))


# -- amplification ----------------------------------------------------------------------------------


def test_amplification_is_c_over_a_by_construction() -> None:
    u, v = orthonormal(16, 5, 2), orthonormal(12, 5, 3)
    # W = a u1 v1ᵀ + an orthogonal part on the other directions; ΔW = c u1 v1ᵀ
    a, c = 0.5, -4.0
    weight = a * u[:, :1] @ v[:, :1].T + u[:, 1:] @ torch.diag(torch.tensor([7.0, 3.0, 2.0, 1.0])) @ v[:, 1:].T
    delta = c * u[:, :1] @ v[:, :1].T
    assert amplification(delta, weight, 1) == pytest.approx(abs(c) / abs(a), rel=1e-5)
    # W with nothing in ΔW's directions: undefined, not infinite
    assert math.isnan(amplification(delta, weight - a * u[:, :1] @ v[:, :1].T, 1))


# -- intruders --------------------------------------------------------------------------------------


def full_rank_base() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = Q diag(s) Rᵀ, 16×12 of full rank, and a unit vector u orthogonal to every column of Q."""
    q = orthonormal(16, 13, 4)
    r = orthonormal(12, 12, 5)
    s = torch.linspace(12.0, 1.0, 12)
    return q[:, :12] @ torch.diag(s) @ r.T, q, r, s


def test_no_change_no_intruders() -> None:
    w0, *_ = full_rank_base()
    result = intruders(w0, w0.clone())
    assert result["count"] == 0
    assert result["max_cos"] == pytest.approx([1.0] * 10, abs=1e-4)
    assert set(result["by_epsilon"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}
    assert all(n == 0 for n in result["by_epsilon"].values())


def test_new_top_direction_is_one_intruder() -> None:
    # ΔW = c u r1ᵀ with u ⟂ col(W0): W = Σ_{i≥2} s_i q_i r_iᵀ + (s1 q1 + c u) r1ᵀ is an exact SVD whose top
    # left vector (s1 q1 + c u)/N has max |cos| s1/N with the base, and holds c²/N² of ‖ΔW‖².
    w0, q, r, s = full_rank_base()
    u = q[:, 12:13]
    cos = 0.35
    c = float(s[0]) * math.sqrt(1 / cos**2 - 1)
    result = intruders(w0, w0 + c * u @ r[:, :1].T)
    assert result["max_cos"][0] == pytest.approx(cos, abs=1e-4)
    assert result["max_cos"][1:] == pytest.approx([1.0] * 9, abs=1e-4)
    assert result["count"] == 1
    assert result["energy"] == pytest.approx(1 - cos**2, abs=1e-4)
    counts = list(result["by_epsilon"].values())
    assert counts == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert counts == sorted(counts)

    large = intruders(w0, w0 + 500.0 * u @ r[:, :1].T)
    assert large["count"] == 1 and large["by_epsilon"]["0.1"] == 1
    assert large["energy"] == pytest.approx(1.0, abs=1e-3)


def test_precomputed_base_vectors_and_batch_agree() -> None:
    w0, q, r, _ = full_rank_base()
    tuned = torch.stack([w0 + 30.0 * q[:, 12:13] @ r[:, i : i + 1].T for i in range(3)])
    singles = [intruders(w0, t) for t in tuned]
    base_u = torch.linalg.svd(w0, full_matrices=False).U
    assert [intruders(w0, t, base_u=base_u) for t in tuned] == singles
    batched = intruders_batched(w0, tuned)
    assert [b["count"] for b in batched] == [s["count"] for s in singles] == [1, 1, 1]
    for b, s in zip(batched, singles, strict=True):
        assert b["max_cos"] == pytest.approx(s["max_cos"], abs=1e-5)
        assert b["energy"] == pytest.approx(s["energy"], abs=1e-5)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 32)
        self.down = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_counts_match_peft_reduce_intruder_dimension() -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    ours = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            layer.lora_B["default"].weight.data *= 20.0
            w = layer.get_base_layer().weight.data
            ours[name] = intruders(w, w + layer.get_delta_weight("default"))["count"]

    lines: list[str] = []
    reduce_intruder_dimension(model, logging_sink=lines.append)
    theirs = {}
    for line in lines:
        name, _, verdict = line.partition(": ")
        if verdict == "No intruders":
            theirs[name] = 0
        elif verdict.startswith("Intruders: "):
            theirs[name] = int(verdict.removeprefix("Intruders: "))
    assert len(ours) == 2
    assert theirs == ours
    assert max(ours.values()) > 0


# -- subspace similarity ----------------------------------------------------------------------------


def test_right_basis_shape_and_cap() -> None:
    a = torch.randn(4, 20, generator=torch.Generator().manual_seed(6))
    basis = right_basis(a, 8)
    assert basis.shape == (20, 4)
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    assert right_basis(a, 2).shape == (20, 2)


def test_subspace_similarity_identical_orthogonal_and_by_hand() -> None:
    basis = right_basis(torch.randn(6, 30, generator=torch.Generator().manual_seed(7)), 6)
    phi = subspace_similarity(basis, basis)
    assert phi.shape == (6, 6)
    assert torch.allclose(phi, torch.ones(6, 6), atol=1e-5)  # ‖U_iᵀU_j‖² = min(i, j)

    eye = torch.eye(4)
    assert torch.equal(subspace_similarity(eye[:, :2], eye[:, 2:]), torch.zeros(2, 2))

    # U1 = [e1, e2], U2 = [(e1 + e2)/√2, e3]: squared cross-Gram [[.5, 0], [.5, 0]]
    b1 = torch.eye(3)[:, :2]
    b2 = torch.tensor([[1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 0.0], [0.0, 1.0]])
    expected = torch.tensor([[0.5, 0.5], [1.0, 0.5]])
    assert torch.allclose(subspace_similarity(b1, b2), expected, atol=1e-6)
    assert torch.allclose(subspace_similarity(b2, b1), expected.T, atol=1e-6)


# -- representations --------------------------------------------------------------------------------


def gram_unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC written out with n×n Gram matrices (no centring)."""
    n = x.shape[0]
    k, m = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    m.fill_diagonal_(0)
    one = torch.ones(n, dtype=x.dtype)
    value = (
        torch.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ k @ m @ one)
    )
    return float(value / (n * (n - 3)))


def test_debiased_cka_matches_gram_implementation() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(30, 8, generator=g) + 2.0  # offset: the estimator must not depend on centring
    y = x[:, :5] @ torch.randn(5, 5, generator=g) + 0.5 * torch.randn(30, 5, generator=g)
    xd, yd = x.double(), y.double()
    expected = gram_unbiased_hsic(xd, yd) / math.sqrt(gram_unbiased_hsic(xd, xd) * gram_unbiased_hsic(yd, yd))
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-8)
    assert 0.3 < expected < 1.0  # a case that tells correlated from identical


def test_cka_invariant_to_rotation_and_scale() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 8, generator=g)
    rotation = orthonormal(8, 8, 10)
    for debiased in (True, False):
        assert linear_cka(x, x @ rotation, debiased=debiased) == pytest.approx(1.0, abs=1e-6)
        assert linear_cka(x, 3.5 * x, debiased=debiased) == pytest.approx(1.0, abs=1e-6)


def test_biased_cka_is_inflated_when_features_outnumber_rows() -> None:
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(20, 1000, generator=g), torch.randn(20, 1000, generator=g)
    biased, debiased = linear_cka(x, y, debiased=False), linear_cka(x, y)
    assert biased > 0.8
    assert abs(debiased) < 0.1


def test_cka_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2))
    assert math.isnan(linear_cka(torch.ones(10, 3), torch.randn(10, 3)))
    assert math.isnan(linear_cka(torch.ones(10, 3), torch.randn(10, 3), debiased=False))


def test_cosine_distance() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([[2.0, 0.0], [3.0, 0.0], [-1.0, -1.0]])
    assert cosine_distance(x, y) == pytest.approx((0.0 + 1.0 + 2.0) / 3)
    assert cosine_distance(x, x) == pytest.approx(0.0, abs=1e-7)


# -- attention --------------------------------------------------------------------------------------


def causal_uniform(length: int) -> torch.Tensor:
    """Row i uniform over keys ≤ i, [T, T]."""
    tri = torch.ones(length, length).tril()
    return tri / tri.sum(-1, keepdim=True)


def test_uniform_encoder_attention() -> None:
    n = 6
    attn = torch.full((2, 3, n, n), 1 / n)
    stats = attention_stats(attn, torch.ones(2, n), causal=False)
    assert stats["entropy"].dtype == torch.float64
    assert stats["rows"].tolist() == [12.0] * 3
    means = finish(stats)
    assert means["entropy"] == pytest.approx([math.log(n)] * 3)
    assert means["entropy_norm"] == pytest.approx([1.0] * 3)
    assert means["entropy_norm_no_first"] == pytest.approx([1.0] * 3)
    # mean |i − j| over all pairs of 6 positions: 2·Σ_{d=1..5} (6 − d)·d / 36 = 70/36
    assert means["distance"] == pytest.approx([70 / 36] * 3)


def test_causal_uniform_attention_has_normalised_entropy_one() -> None:
    n = 5
    attn = causal_uniform(n).expand(1, 2, n, n)
    stats = attention_stats(attn, torch.ones(1, n), causal=True)
    assert stats["rows"].tolist() == [5.0, 5.0]
    assert stats["rows_norm"].tolist() == [4.0, 4.0]  # row 0 has one key
    assert finish(stats)["entropy_norm"] == pytest.approx([1.0, 1.0])
    assert stats["entropy"].tolist() == pytest.approx([sum(math.log(i) for i in range(1, n + 1))] * 2)


def test_distance_of_attention_at_fixed_offset() -> None:
    n, d = 8, 3
    attn = torch.zeros(1, 1, n, n)
    for i in range(n):
        attn[0, 0, i, i - d if i >= d else i + d] = 1.0
    assert finish(attention_stats(attn, torch.ones(1, n), causal=False))["distance"] == pytest.approx([float(d)])
    assert finish(attention_stats(attn, torch.ones(1, n), causal=False))["entropy"] == pytest.approx([0.0])


def test_js_identical_zero_and_disjoint_one_hot_ln2() -> None:
    n = 4
    attn = torch.softmax(torch.randn(2, 3, n, n, generator=torch.Generator().manual_seed(12)), -1)
    same = attention_js(attn, attn.clone(), torch.ones(2, n), causal=False)
    assert same["js"].tolist() == pytest.approx([0.0] * 3, abs=1e-6)
    assert same["rows"].tolist() == [8.0] * 3

    a = torch.zeros(1, 1, n, n)
    b = torch.zeros(1, 1, n, n)
    a[..., 0] = 1.0
    b[..., 1] = 1.0
    assert finish(attention_js(a, b, torch.ones(1, n), causal=False))["js"] == pytest.approx([math.log(2)])


def test_padding_is_ignored_left_and_right() -> None:
    n = 5
    junk = torch.softmax(torch.randn(2, 1, n, n, generator=torch.Generator().manual_seed(13)), -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    # Real rows: uniform over the real keys ≤ i, plus mass on padded keys that must be renormalised away.
    attn = junk.clone()
    for b, real in enumerate(([0, 1, 2], [2, 3, 4])):
        for k, i in enumerate(real):
            attn[b, 0, i] = 0.0
            attn[b, 0, i, real[: k + 1]] = 0.6 / (k + 1)
            pad = [j for j in range(n) if j not in real]
            attn[b, 0, i, pad] = 0.4 / len(pad)
    stats = attention_stats(attn, mask, causal=True)
    assert stats["rows"].tolist() == [6.0]
    assert stats["rows_norm"].tolist() == [4.0]
    assert stats["entropy"].tolist() == pytest.approx([2 * (math.log(2) + math.log(3))])
    assert finish(stats)["entropy_norm"] == pytest.approx([1.0])
    # distance: rows with keys {0}, {0,1}, {0,1,2} → 0 + 1/2 + 1 in each sequence
    assert stats["distance"].tolist() == pytest.approx([3.0])
    # dropping the first real token leaves ≥ 2 keys only in the third row of each sequence: uniform → 1
    assert stats["rows_no_first"].tolist() == [2.0]
    assert finish(stats)["entropy_norm_no_first"] == pytest.approx([1.0])

    js = attention_js(attn, junk, mask, causal=True)
    assert js["rows"].tolist() == [6.0]
    # the padded rows (different in the two models) add nothing; real rows compared after renormalising
    assert attention_js(attn, attn + 0.1 * (1 - mask[:, None, :, None]), mask, causal=True)["js"].item() == 0.0
    # mass moved onto padded keys is renormalised away
    assert attention_js(attn, attn + 0.1 * (1 - mask[:, None, None, :]), mask, causal=True)["js"].item() == 0.0


def test_entropy_without_the_first_token() -> None:
    # encoder, 3 real keys: half the mass on the first token, the rest split evenly between the other two
    attn = torch.tensor([0.5, 0.25, 0.25]).expand(1, 1, 3, 3)
    stats = attention_stats(attn, torch.ones(1, 3), causal=False)
    means = finish(stats)
    assert means["entropy_norm_no_first"] == pytest.approx([1.0])
    assert means["entropy_norm"][0] < 1.0
    # a row with all its mass on the first token has nothing left: skipped, and the mean is nan when alone
    sink = torch.tensor([1.0, 0.0, 0.0]).expand(1, 1, 3, 3)
    sink_stats = attention_stats(sink, torch.ones(1, 3), causal=False)
    assert sink_stats["rows_no_first"].tolist() == [0.0]
    assert math.isnan(finish(sink_stats)["entropy_norm_no_first"][0])


def test_finish_divides_by_the_matching_count() -> None:
    sums = {
        "entropy": torch.tensor([2.0, 0.0], dtype=torch.float64),
        "entropy_norm": torch.tensor([1.0, 3.0], dtype=torch.float64),
        "rows": torch.tensor([4.0, 0.0], dtype=torch.float64),
        "rows_norm": torch.tensor([2.0, 3.0], dtype=torch.float64),
    }
    means = finish(sums)
    assert set(means) == {"entropy", "entropy_norm"}
    assert means["entropy"][0] == 0.5 and math.isnan(means["entropy"][1])
    assert means["entropy_norm"] == [0.5, 1.0]
