"""AlphaPruning (Lu et al., NeurIPS 2024): layer ratios from the heavy-tail exponent of each ESD.

Each prunable linear gets α, the power-law exponent of the empirical spectral density (ESD) of
WᵀW fitted by maximum likelihood (Hill estimator) with the xmin that minimises the
Kolmogorov–Smirnov distance (Clauset et al. 2009), searched only near the histogram peak of the
log-eigenvalues (the reference's ``fix_fingers='xmin_peak'``). Heavier tails (smaller α) mean a
better-trained layer, which is pruned less. α is averaged per block, mapped linearly to
[1 − ε, 1 + ε] and rescaled so the parameter-weighted mean ratio equals the target sparsity.

Reference: eliacunegatti/NeuroAL ``sparsity_distribution.py`` (``net_esd_estimator``,
``ww_sparsity``, ``get_alpha_sparsity_distribution``), itself a copy of haiquanlu/AlphaPruning
``lib/esd_utils.py``. Deviations are listed in each function's docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from neuroal.allocation import ratios as R
from neuroal.allocation.base import ALLOCATORS, Allocation, AllocationProblem, Allocator, Evidence

logger = logging.getLogger(__name__)

ESD_DTYPE = torch.float32  # the reference's precision for the SVD and the histogram
FIT_DTYPE = torch.float64  # the Hill / KS sweep (the reference does it in float32; see esd_fit)
CLIP_LOW, CLIP_HIGH = 0.01, 0.99  # bounds applied when a ratio leaves [0, 1)


@dataclass(frozen=True)
class EsdFit:
    """Result of the power-law fit of one weight matrix's ESD.

    Attributes:
        alpha: fitted exponent α of p(λ) ∝ λ^(−α) for λ ≥ xmin (the reference's ``alpha``).
        D: KS distance of the chosen fit (1.0 if no candidate was evaluated).
        xmin: the chosen lower cut-off (an eigenvalue of WᵀW; nan if no candidate).
        xmin_peak: left edge of the peak bin of the log10-eigenvalue histogram (``xmin2``).
        n_candidates: how many xmin candidates were evaluated.
    """

    alpha: float
    D: float
    xmin: float
    xmin_peak: float
    n_candidates: int


def _eigenvalues(W: Tensor) -> Tensor:
    """Ascending eigenvalues of WᵀW as squared singular values, float32 (the reference's path)."""
    lam = torch.linalg.svdvals(W.detach().to(ESD_DTYPE)).square()  # [min(out, in)]
    return torch.sort(lam).values


def esd_fit(
    W: Tensor,
    *,
    bins: int = 100,
    xmin_floor: Literal["reference", "linear"] = "reference",
    chunk_elems: int = 1 << 22,
) -> EsdFit:
    """Fit a power law to the ESD of WᵀW with xmin searched near the histogram peak.

    Same algorithm as the reference's ``net_esd_estimator(fix_fingers='xmin_peak')`` with
    ``filter_zeros=False``:

    1. λ = squared singular values of W in float32, ascending (N = min(out, in) values).
    2. Histogram of log10 λ in ``bins`` equal bins over [min, max] (``torch.histc``); the left edge
       of the fullest bin (first on ties) gives ``xmin2 = 10 ** edge``.
    3. Candidates: every λ_i except the largest with ``floor ≤ λ_i ≤ 1.5 · xmin2``.
    4. For each candidate, the Hill/MLE exponent over the n = N − i eigenvalues ≥ λ_i,
       α_i = 1 + n / Σ_{j≥i} ln(λ_j / λ_i), and the KS distance
       D_i = max_{j≥i} |1 − (λ_j / λ_i)^(1 − α_i) − (j − i) / n|
       (evaluated only when α_i > 1; otherwise D_i stays 1).
    5. The candidate with the smallest D wins (first on ties). As in the reference, if no
       candidate exists the result is α = 0 (its ``alphas`` array starts at zero); this is logged.

    The reference's quirk in step 3, reproduced by default (``xmin_floor="reference"``): the floor
    is ``log10(0.95 · xmin2)``, a log-space number compared against linear-space eigenvalues.
    Since log10(y) < y for every y > 0, this floor is always below the evidently intended
    ``0.95 · xmin2``; whenever xmin2 < 1/0.95 ≈ 1.053 it is negative and every eigenvalue passes, and
    for larger xmin2 it is a few units at most (log10 of the peak). In practice the search therefore
    runs from the smallest eigenvalue (or from a low floor) up to 1.5 · xmin2, and the KS-optimal
    xmin may lie well below the histogram peak. ``xmin_floor="linear"`` uses ``0.95 · xmin2`` instead.

    Deviation: the sweep is vectorised (suffix sums of ln λ give every α at once; the KS distances
    are computed in chunks of at most ``chunk_elems`` matrix entries, so an 8192-wide layer stays
    within a few tens of MB) and done in float64 from the float32 eigenvalues, where the
    reference loops in float32. The result matches a per-candidate float64 loop to ~1e-12 and the
    reference's float32 loop to a few 1e-6 relative (its Hill denominator Σ ln λ_j − n ln λ_i
    cancels in float32).

    Args:
        W: [out, in] weight matrix (any float dtype; the SVD runs in float32 on W's device).
        bins: histogram bins for the peak (the reference uses 100).
        xmin_floor: "reference" (log-space floor, the reference's behaviour) or "linear".
        chunk_elems: memory bound for the KS sweep, in matrix entries per chunk.

    Returns:
        The fit, an `EsdFit`.

    Raises:
        ValueError: W has fewer than two singular values, or a zero one (the reference's
            ``log`` of a zero eigenvalue makes its histogram range infinite and fails).
    """
    if xmin_floor not in ("reference", "linear"):
        raise ValueError(f"xmin_floor: got {xmin_floor!r}; allowed: reference, linear")
    if W.ndim != 2:
        raise ValueError(f"W: expected a 2-D [out, in] matrix, got shape {tuple(W.shape)}")
    lam = _eigenvalues(W)  # [N] ascending, float32
    N = lam.numel()
    if N < 2:
        raise ValueError(f"W: need at least 2 singular values for a power-law fit, got {N}")
    if not bool(lam[0] > 0):
        raise ValueError(
            "W: has a zero singular value (rank-deficient); the ESD fit takes log λ of every "
            "eigenvalue, as the reference does, so it needs a full-rank matrix"
        )

    # Peak of the log10 histogram, in float32 exactly as the reference computes it.
    log10_lam = torch.log10(lam)
    lo, hi = log10_lam.min().item(), log10_lam.max().item()
    counts = torch.histc(log10_lam, bins=bins, min=lo, max=hi)  # [bins]
    edges = torch.linspace(lo, hi, bins + 1, dtype=ESD_DTYPE, device=lam.device)  # [bins + 1]
    xmin2 = torch.pow(10.0, edges[torch.argmax(counts)])
    floor = torch.log10(0.95 * xmin2) if xmin_floor == "reference" else 0.95 * xmin2
    ceiling = 1.5 * xmin2

    # Candidates form one contiguous index range because λ is sorted (the reference's
    # `continue` below the floor and `break` above the ceiling).
    is_candidate = (lam[:-1] >= floor) & (lam[:-1] <= ceiling)  # [N - 1]
    cand = torch.nonzero(is_candidate).flatten()
    alphas = torch.zeros(N - 1, dtype=FIT_DTYPE, device=lam.device)
    Ds = torch.ones(N - 1, dtype=FIT_DTYPE, device=lam.device)
    if cand.numel() == 0:
        logger.warning("esd_fit: no xmin candidate in [%g, %g]; alpha = 0 as in the reference",
                       floor.item(), ceiling.item())
    else:
        L = lam.to(FIT_DTYPE).log()  # [N] ln λ
        suffix = torch.flip(torch.cumsum(torch.flip(L, (0,)), 0), (0,))  # [N] Σ_{j≥i} ln λ_j
        i0, i1 = int(cand[0]), int(cand[-1]) + 1
        idx = torch.arange(i0, i1, device=lam.device)  # [C]
        n = (N - idx).to(FIT_DTYPE)  # [C] tail sizes
        alpha = 1 + n / (suffix[i0:i1] - n * L[i0:i1])  # [C]
        alphas[i0:i1] = alpha
        Ds[i0:i1] = _ks_distances(L, idx, alpha, chunk_elems)
    best = int(torch.argmin(Ds))
    return EsdFit(
        alpha=float(alphas[best]),
        D=float(Ds[best]),
        xmin=float(lam[best]) if cand.numel() else float("nan"),
        xmin_peak=float(xmin2),
        n_candidates=int(cand.numel()),
    )


def _ks_distances(L: Tensor, idx: Tensor, alpha: Tensor, chunk_elems: int) -> Tensor:
    """KS distance of each candidate's fitted power law to the empirical tail; 1 where α ≤ 1.

    L: [N] ascending ln λ; idx: [C] candidate positions (contiguous); alpha: [C].
    """
    N = L.numel()
    D = torch.ones_like(alpha)  # [C]
    start = 0
    while start < idx.numel():
        first = int(idx[start])
        width = N - first  # columns j ≥ first cover every candidate of this chunk
        rows = max(1, chunk_elems // width)
        sl = slice(start, start + rows)
        i, a = idx[sl], alpha[sl]  # [c]
        j = torch.arange(first, N, device=L.device)  # [width]
        n = (N - i).to(L.dtype)  # [c]
        log_ratio = L[first:][None, :] - L[i][:, None]  # [c, width] ln(λ_j / λ_i)
        fitted_cdf = 1 - torch.exp((1 - a)[:, None] * log_ratio)
        empirical = (j[None, :] - i[:, None]).to(L.dtype) / n[:, None]
        gap = (fitted_cdf - empirical).abs().masked_fill(j[None, :] < i[:, None], 0.0)
        D[sl] = torch.where(a > 1, gap.amax(dim=1), D[sl])
        start += rows
    return D


def esd_alpha(
    W: Tensor,
    *,
    bins: int = 100,
    xmin_floor: Literal["reference", "linear"] = "reference",
    chunk_elems: int = 1 << 22,
) -> float:
    """Heavy-tail exponent α of the ESD of WᵀW (AlphaPruning's per-layer metric).

    Shorthand for ``esd_fit(W, ...).alpha``; see `esd_fit` for the algorithm, the reference's
    ``log10(0.95 · xmin2)`` floor quirk (reproduced by default) and the ``xmin_floor`` switch.

    Args:
        W: [out, in] weight matrix.
        bins: histogram bins for the peak (100 in the reference).
        xmin_floor: "reference" (faithful log-space floor) or "linear" (0.95 · xmin2).
        chunk_elems: memory bound for the KS sweep, in matrix entries per chunk.

    Returns:
        α as a Python float.
    """
    return esd_fit(W, bins=bins, xmin_floor=xmin_floor, chunk_elems=chunk_elems).alpha


def alpha_ratios(
    alphas: Sequence[float],
    block_of: Sequence[int],
    numels: Sequence[int],
    sparsity: float,
    epsilon: float = 0.3,
) -> list[float]:
    """Per-linear sparsity ratios from per-linear α (AlphaPruning's allocation).

    As the reference's ``ww_sparsity``: α is averaged over each block's linears, the block means are
    mapped linearly to [s1, s2] = [1 − ε, 1 + ε] (lowest mean → s1, highest → s2; higher α → more
    pruning), and every ratio is multiplied by Σ numel · s / Σ numel · mapped so that the
    parameter-weighted mean ratio equals ``sparsity``. Mapping to [s(1 − ε), s(1 + ε)] as the paper
    writes it gives the same result, the rescaling being scale-invariant.

    Deviations, both where the reference would produce unusable ratios:

    - If any ratio leaves [0, 1) (e.g. sparsity 0.8 with ε = 0.3 puts the top blocks above 1; the
      reference would then prune whole layers), all ratios are clipped to [0.01, 0.99] and a
      warning is logged. The weighted mean then deviates from ``sparsity`` (the warning states by
      how much); it is not renormalised.
    - If all block means are equal the linear map is 0/0 (NaN in the reference); every linear gets
      ``sparsity``.

    Blocks are given explicitly by ``block_of`` rather than by the reference's assumption that
    consecutive equal-sized slices of the layer list form the blocks.

    Args:
        alphas: α of each prunable linear (`esd_alpha`), in model order.
        block_of: block index of each linear (same length).
        numels: parameter count of each linear (same length).
        sparsity: target parameter-weighted mean ratio, in [0, 1).
        epsilon: half-width of the mapped interval around 1 (0.3 in the reference).

    Returns:
        One ratio per linear, constant within a block and non-decreasing in the block's mean α.

    Raises:
        ValueError: lengths differ, the list is empty, or sparsity / epsilon are out of range.
    """
    if not (len(alphas) == len(block_of) == len(numels)) or len(alphas) == 0:
        raise ValueError(
            f"alpha_ratios: alphas, block_of and numels must be non-empty and of equal length; "
            f"got {len(alphas)}, {len(block_of)}, {len(numels)}"
        )
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: got {sparsity}; allowed: [0, 1)")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon: got {epsilon}; allowed: [0, 1)")

    a = torch.tensor([float(x) for x in alphas], dtype=torch.float64)  # [n_linear]
    blocks = torch.tensor([int(b) for b in block_of])  # [n_linear]
    numel = torch.tensor([float(x) for x in numels], dtype=torch.float64)  # [n_linear]
    _, block_id = torch.unique(blocks, return_inverse=True)
    n_blocks = int(block_id.max()) + 1
    block_sum = torch.zeros(n_blocks, dtype=torch.float64).index_add_(0, block_id, a)
    block_count = torch.zeros(n_blocks, dtype=torch.float64).index_add_(0, block_id, torch.ones_like(a))
    score = (block_sum / block_count)[block_id]  # [n_linear] block-mean α of each linear

    lo, hi = score.min(), score.max()
    if hi == lo:
        logger.info("alpha_ratios: all block-mean alphas are equal (%g); uniform %g", lo.item(), sparsity)
        return [float(sparsity)] * len(alphas)
    s1, s2 = 1.0 - epsilon, 1.0 + epsilon
    mapped = (score - lo) / (hi - lo) * (s2 - s1) + s1
    ratios = mapped * (numel.sum() * sparsity / (numel * mapped).sum())

    if bool((ratios < 0).any() or (ratios >= 1).any()):
        ratios = ratios.clamp(CLIP_LOW, CLIP_HIGH)
        achieved = float((numel * ratios).sum() / numel.sum())
        logger.warning(
            "alpha_ratios: ratios outside [0, 1) at sparsity %g, epsilon %g; clipped to [%g, %g], "
            "so the weighted mean is %.6f instead of %g",
            sparsity, epsilon, CLIP_LOW, CLIP_HIGH, achieved, sparsity,
        )
    return ratios.tolist()


@ALLOCATORS.register("alpha")
@dataclass(frozen=True)
class AlphaPruning(Allocator):
    """AlphaPruning: `neuroal prune --top-up alpha` (grid knob `alpha_epsilon`, 0.3)."""

    epsilon: float = 0.3

    evidence = Evidence.WEIGHTS
    knobs = {"epsilon": "alpha_epsilon"}
    summary = "AlphaPruning: block sparsity from the ESD heavy-tail exponent (ε=0.3)"

    def weight_summary(self, W: Tensor) -> float:
        return esd_alpha(W)

    def allocate(self, problem: AllocationProblem, evidence: Mapping[int, Mapping[str, float]]) -> Allocation:
        flat, block_of, numels = [], [], []
        for b in range(problem.n_blocks):
            for name in problem.linears:
                out, inp = problem.shapes[name]
                flat.append(evidence[b][name])
                block_of.append(b)
                numels.append(out * inp)
        values = alpha_ratios(flat, block_of, numels, problem.sparsity, self.epsilon)
        return Allocation(R.per_linear(values, problem.n_blocks, problem.linears), extra={"esd_alpha": flat})
