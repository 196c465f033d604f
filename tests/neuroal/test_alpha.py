"""AlphaPruning: ESD exponent fit and the α → ratio allocation."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from neuroal.allocation.alpha import alpha_ratios, esd_alpha, esd_fit


def loop_esd_alpha(
    W: torch.Tensor, *, linear_floor: bool = False, bins: int = 100, dtype=torch.float64
) -> float:
    """Straightforward per-candidate loop: the reference's xmin_peak procedure.

    Eigenvalues and histogram in float32 as the reference; the fit in `dtype` (the reference
    uses float32).
    """
    lam = torch.sort(torch.linalg.svdvals(W.float()).square()).values
    N = len(lam)
    logs = torch.log(lam.to(dtype))
    h = torch.log10(lam)
    counts = torch.histc(h, bins, min=h.min().item(), max=h.max().item())
    edges = torch.linspace(h.min().item(), h.max().item(), bins + 1)
    xmin2 = 10 ** edges[torch.argmax(counts)]
    floor = 0.95 * xmin2 if linear_floor else torch.log10(0.95 * xmin2)
    ceiling = 1.5 * xmin2
    alphas, Ds = torch.zeros(N - 1, dtype=dtype), torch.ones(N - 1, dtype=dtype)
    for i in range(N - 1):
        xmin = lam[i]
        if xmin < floor:
            continue
        if xmin > ceiling:
            break
        n = float(N - i)
        alpha = 1 + n / (torch.sum(logs[i:]) - n * logs[i])
        alphas[i] = alpha
        if alpha > 1:
            seq = torch.arange(n, dtype=dtype)
            ratio = lam[i:].to(dtype) / xmin.to(dtype)
            Ds[i] = torch.max(torch.abs(1 - ratio ** (-alpha + 1) - seq / n))
    return alphas[torch.argmin(Ds)].item()


def power_law_matrix(alpha: float, n: int, seed: int, lam_min: float = 1.0) -> torch.Tensor:
    """W = Q diag(sqrt λ), λ ~ Pareto: p(λ) ∝ λ^(−alpha) for λ ≥ lam_min, so eig(WᵀW) = λ."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    lam = lam_min * u.pow(-1.0 / (alpha - 1.0))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * lam.sqrt()[None, :]).float()


@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.0])
def test_esd_alpha_recovers_power_law_exponent(alpha):
    # MLE standard error is (α − 1)/√n_tail ≈ 0.1 at n = 600 eigenvalues (n_tail ≈ 300–430 for
    # these seeds, measured errors ≤ 0.04); allow 0.25.
    W = power_law_matrix(alpha, 600, seed=int(alpha * 10))
    assert esd_alpha(W) == pytest.approx(alpha, abs=0.25)
    assert esd_alpha(W, xmin_floor="linear") == pytest.approx(alpha, abs=0.25)


def _matrices():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(96, 160, generator=g)  # Marchenko–Pastur bulk, peak below 1
    yield torch.randn(96, 160, generator=g) * 0.02  # LLM-like init scale
    yield torch.randn(200, 120, generator=g) * 3.0  # peak above 1: the floor is a positive log
    torch.manual_seed(0)
    for df in (1.5, 2.5, 4.0):  # heavy-tailed entries
        yield torch.distributions.StudentT(df).sample((150, 130))
    yield power_law_matrix(3.0, 300, seed=1, lam_min=20.0)
    yield power_law_matrix(2.2, 257, seed=2, lam_min=0.01)


@pytest.mark.parametrize("linear_floor", [False, True])
def test_esd_alpha_vectorised_equals_loop(linear_floor):
    for W in _matrices():
        floor = "linear" if linear_floor else "reference"
        fast = esd_alpha(W, xmin_floor=floor)
        tiny_chunks = esd_alpha(W, xmin_floor=floor, chunk_elems=1000)  # many chunks, same answer
        slow = loop_esd_alpha(W, linear_floor=linear_floor)
        assert fast == pytest.approx(slow, abs=1e-5)
        assert tiny_chunks == fast
        # Against the reference's float32 arithmetic: same candidate wins; the float32 Hill sum
        # loses ~1e-6 relative to cancellation (Σ ln λ_j − n ln λ_i), so compare relatively.
        ref32 = loop_esd_alpha(W, linear_floor=linear_floor, dtype=torch.float32)
        assert fast == pytest.approx(ref32, rel=1e-5)


def test_reference_floor_admits_more_candidates_than_linear():
    # A Gaussian matrix: the peak sits in the bulk, so the linear floor 0.95·xmin2 cuts the
    # candidates below the peak, while the reference's log10(0.95·xmin2) < 0 admits them all.
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) / 20  # λ ≈ 0.05 … 1.9
    ref, lin = esd_fit(W), esd_fit(W, xmin_floor="linear")
    assert ref.xmin_peak == lin.xmin_peak < 1 / 0.95
    assert ref.n_candidates > lin.n_candidates > 0
    lam = torch.sort(torch.linalg.svdvals(W).square()).values
    assert ref.n_candidates == int((lam[:-1] <= 1.5 * ref.xmin_peak).sum())  # from the smallest λ
    assert math.isfinite(ref.alpha) and ref.alpha > 1 and math.isfinite(lin.alpha) and lin.alpha > 1


def test_esd_alpha_rejects_rank_deficient_and_bad_args():
    W = torch.randn(8, 8)
    W[:, 0] = 0
    with pytest.raises(ValueError, match="zero singular value"):
        esd_alpha(W)
    with pytest.raises(ValueError, match="xmin_floor"):
        esd_alpha(torch.randn(8, 8), xmin_floor="log")


def test_ks_sweep_wide_layer_chunked():
    # The KS sweep of a 4096-wide layer (no SVD: synthetic sorted ln λ, every index a candidate),
    # in chunks of ≤ 4M entries (default) and ≤ 0.5M entries: identical distances.
    from neuroal.allocation.alpha import _ks_distances

    L = torch.sort(torch.randn(4096, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).values
    idx = torch.arange(0, 4095)
    n = (4096 - idx).to(torch.float64)
    suffix = torch.flip(torch.cumsum(torch.flip(L, (0,)), 0), (0,))
    alpha = 1 + n / (suffix[:-1] - n * L[:-1])
    D_big = _ks_distances(L, idx, alpha, chunk_elems=1 << 22)
    D_small = _ks_distances(L, idx, alpha, chunk_elems=1 << 19)
    assert torch.equal(D_big, D_small)
    assert ((D_big > 0) & (D_big < 1)).all()


# ---------------------------------------------------------------------------------- alpha_ratios

ALPHAS = [3.1, 2.9, 3.0, 2.0, 2.2, 2.4, 4.5, 4.0, 5.0, 3.3, 3.3, 3.3]
BLOCKS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
NUMELS = [64, 64, 256, 64, 64, 256, 64, 64, 256, 64, 64, 256]


def weighted_mean(ratios, numels):
    return sum(r * n for r, n in zip(ratios, numels)) / sum(numels)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.7])
def test_alpha_ratios_weighted_mean_equals_target(sparsity):
    ratios = alpha_ratios(ALPHAS, BLOCKS, NUMELS, sparsity)
    assert weighted_mean(ratios, NUMELS) == pytest.approx(sparsity, abs=1e-6)
    assert all(0 <= r < 1 for r in ratios)


def test_alpha_ratios_constant_in_block_and_monotone_in_block_alpha():
    ratios = alpha_ratios(ALPHAS, BLOCKS, NUMELS, 0.5)
    by_block = {}
    for r, b in zip(ratios, BLOCKS):
        by_block.setdefault(b, set()).add(r)
    assert all(len(v) == 1 for v in by_block.values())
    means = {b: sum(a for a, bb in zip(ALPHAS, BLOCKS) if bb == b) / 3 for b in by_block}
    order = sorted(by_block, key=means.get)  # ascending mean α
    block_ratio = [next(iter(by_block[b])) for b in order]
    assert block_ratio == sorted(block_ratio) and block_ratio[0] < block_ratio[-1]
    # The span is the mapped [1 − ε, 1 + ε] times one common scaler.
    assert block_ratio[-1] / block_ratio[0] == pytest.approx(1.3 / 0.7)


def test_alpha_ratios_matches_reference_formula_for_consecutive_blocks():
    # The reference: block means of consecutive equal slices, map to [s1, s2], rescale.
    s, eps = 0.55, 0.2
    means = [sum(ALPHAS[i : i + 3]) / 3 for i in range(0, 12, 3)]
    per_linear = torch.tensor([m for m in means for _ in range(3)], dtype=torch.float64)
    numel = torch.tensor(NUMELS, dtype=torch.float64)
    mapped = (per_linear - per_linear.min()) / (per_linear.max() - per_linear.min()) * 2 * eps + 1 - eps
    expected = mapped * numel.sum() * s / (numel * mapped).sum()
    assert alpha_ratios(ALPHAS, BLOCKS, NUMELS, s, eps) == pytest.approx(expected.tolist(), abs=1e-12)


def test_alpha_ratios_clips_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="neuroal.allocation.alpha"):
        ratios = alpha_ratios(ALPHAS, BLOCKS, NUMELS, 0.9, epsilon=0.3)
    assert "clipped" in caplog.text
    assert min(ratios) >= 0.01 and max(ratios) == pytest.approx(0.99)
    assert weighted_mean(ratios, NUMELS) < 0.9  # the documented deviation from the target
    by_mean = sorted(zip([sum(ALPHAS[i : i + 3]) for i in range(0, 12, 3)], ratios[::3]))
    assert [r for _, r in by_mean] == sorted(r for _, r in by_mean)  # still monotone


def test_alpha_ratios_no_warning_in_range(caplog):
    with caplog.at_level(logging.WARNING, logger="neuroal.allocation.alpha"):
        alpha_ratios(ALPHAS, BLOCKS, NUMELS, 0.5)
    assert caplog.text == ""


def test_alpha_ratios_uniform_when_all_blocks_equal_and_validates():
    assert alpha_ratios([2.0, 2.0, 3.0, 1.0], [0, 0, 1, 1], [1, 1, 1, 1], 0.6) == [0.6] * 4
    with pytest.raises(ValueError, match="equal length"):
        alpha_ratios([2.0], [0, 1], [1], 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        alpha_ratios([2.0, 3.0], [0, 1], [1, 1], 1.0)


def test_alpha_ratios_non_contiguous_block_ids():
    a = alpha_ratios([2.0, 3.0, 2.0, 3.0], [7, 9, 7, 9], [1, 1, 1, 1], 0.5)
    assert a[0] == a[2] < a[1] == a[3]
    assert sum(a) / 4 == pytest.approx(0.5)
