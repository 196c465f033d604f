"""DSnoT (Zhang et al., ICLR 2024): training-free prune-and-grow on top of an initial mask.

Dynamic Sparse No Training keeps each row's sparsity and swaps one pruned weight for one kept
weight per cycle, steered by the expected reconstruction error of the row,

    e = Σ_{j pruned} W_j · E[x_j]        (dense output − sparse output, in expectation),

so that e shrinks: when e > 0 the pruned weight with the largest W_j E[x_j] / Var[x_j] is regrown
and a kept weight with W_j E[x_j] < 0 is pruned (the one with the lowest Wanda score), and
symmetrically when e ≤ 0. A row stops once |e| ≤ ``update_threshold``, after ``max_cycles``
cycles, or (with the same-sign rule) when a swap would flip the sign of e.

Follows eliacunegatti/NeuroAL ``lib/prune.py`` ``prune_DSnoT`` (a copy of zyxxmu/DSnoT) with
``lib/utils.py`` ``return_reorder_indice``, vectorised over rows. Facts of the reference run:

- ``--without_same_sign`` is declared ``type=bool, default=True``, so it is always true and the
  unstructured path never applies the same-sign rule: ``same_sign=False`` here by default. Its
  N:M path has no such switch and always applies it; `dsnot_nm_mask` does too.
- Defaults: 50 cycles, threshold 0.1, regrowing metric divided by Var[x]^1 (a power of 0 turns
  the division off, as the reference's ``if args.pow_of_var_regrowing:``).
- The reference skips DSnoT for the MLP linears (``skip_layer='mlp'``, ``'fc'`` for OPT): they get
  the initial mask only. That choice belongs to the caller.

Statistics the caller passes (the reference's ``WrappedGPT`` accumulators, one window per call):

- ``mean_x`` = ``sum_metric_row`` = (Σ over all calibration tokens of x) / (number of windows),
  i.e. seqlen × the per-token mean, not the per-token mean itself. The threshold is absolute,
  so this scale matters: pass ``sum_x / n_windows``.
- ``var_x`` = ``var`` = the mean over windows of each window's biased (1/seqlen) per-channel
  variance (its token-weighted running mean; windows have equal length), not the variance of
  all tokens pooled.

Where the reference misbehaves, and what this module does:

- Its regrow order sorts all ``in`` positions, kept ones included (their metric is 0), and its
  prune order covers the kept weights; two pointers walk inward from each end and keep moving on
  rows that have stopped, whose writes are then meant to be no-ops. If a pointer runs out of its
  valid region (fewer pruned/kept weights of one sign than cycles: only in very narrow rows), the
  reference regrows an already-kept weight or prunes an already-pruned one, changing the row's
  sparsity, or indexes out of range. Here a row stops instead (treated as "no update") when a
  candidate is not currently pruned (regrow) / kept (prune) or a pointer is out of range, and
  stopped rows are not written to. Whenever every candidate the reference visits is valid, which
  is the case for real layer widths, the masks are identical (tested against a transcription of
  the reference loop); each row keeps exactly its initial number of pruned weights.
- ``return_reorder_indice`` lists the negatives of its input in order, then the positives in
  reverse order; entries that are exactly 0 (or NaN) all become index 0, i.e. the lowest-Wanda
  kept weight, possibly repeated. Reproduced; a repeat is then an invalid candidate (above).
- N:M: pruned positions are marked +inf in the initial metric (``W_metric_max_value`` is
  inf + 1 = inf) and a regrown weight keeps its +inf, so it is never pruned again; a group whose
  entries are all +inf has no valid prune candidate and stops the row (the reference would pick
  one by ``topk`` tie-breaking). The reference's initial N:M sort is not stable; here it is
  (exact ties only).
- Var[x] = 0 on a channel divides by zero, as in the reference (±inf/NaN sort to the ends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from neuroal.refiners.base import REFINERS, Refiner
from neuroal.scores import wanda
from neuroal.stats import MOMENTS, NORMS

logger = logging.getLogger(__name__)

STATS_DTYPE = torch.float32  # the reference computes W · E[x] and e in float32


def _check_stats(W: Tensor, mean_x: Tensor, var_x: Tensor, **metrics: Tensor) -> None:
    if W.ndim != 2:
        raise ValueError(f"W: expected [out, in], got shape {tuple(W.shape)}")
    for name, t in metrics.items():
        if t.shape != W.shape:
            raise ValueError(f"{name}: expected shape {tuple(W.shape)} like W, got {tuple(t.shape)}")
    for name, t in (("mean_x", mean_x), ("var_x", var_x)):
        if t.numel() != W.shape[1]:
            raise ValueError(f"{name}: expected {W.shape[1]} values (one per input), got {t.numel()}")


def _error_and_regrow_order(
    D: Tensor, mask: Tensor, var_x: Tensor, pow_of_var: float
) -> tuple[Tensor, Tensor]:
    """Row errors e = Σ_pruned D [out] and the ascending regrow order of D/Var^pow over pruned [out, in]."""
    pruned_D = D.masked_fill(~mask, 0.0)  # [out, in], kept positions are 0 and stay in the order
    e = pruned_D.sum(dim=1)  # [out]
    if pow_of_var:
        pruned_D = pruned_D / var_x.to(STATS_DTYPE).reshape(1, -1).pow(pow_of_var)
    return e, torch.sort(pruned_D, dim=1, stable=True).indices


def reorder_for_pruning(v: Tensor) -> Tensor:
    """The reference's ``return_reorder_indice``: per row, negatives first, positives reversed.

    For each row of ``v`` [rows, k], returns column indices listing the negative entries in their
    order, then one index 0 per entry that is neither negative nor positive (0 or NaN, the
    reference's quirk), then the positive entries in reverse order. E.g. [1, -2, 3] → [1, 2, 0].
    """
    k = v.shape[1]
    j = torch.arange(k, device=v.device).expand_as(v)
    neg, pos = v < 0, v > 0
    key = torch.where(neg, j, torch.where(pos, 2 * k - j, torch.full_like(j, k)))
    order = torch.argsort(key, dim=1, stable=True)  # [rows, k]
    return order.masked_fill(~(neg | pos).gather(1, order), 0)


@torch.no_grad()
def dsnot_mask(
    W: Tensor,
    initial_metric: Tensor,
    wanda_metric: Tensor,
    mean_x: Tensor,
    var_x: Tensor,
    sparsity: float,
    *,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    same_sign: bool = False,
) -> Tensor:
    """Unstructured DSnoT mask: per-row initial mask, then prune-and-grow swaps.

    1. Initial mask: per row, the ``int(in · sparsity)`` lowest ``initial_metric`` (stable sort).
    2. D = W · mean_x (broadcast over rows); e = Σ_pruned D per row.
    3. Regrow order: stable ascending sort of D / var_x^pow over the row (kept positions count as
       0). Prune order: the kept weights ranked by ascending ``wanda_metric``, reordered by
       `reorder_for_pruning` on their D (negatives by rising score, then positives by falling
       score).
    4. Each cycle, per active row: regrow the last not-yet-visited entry of the regrow order if
       e > 0 (the most positive), else the first (most negative); prune the first unvisited entry
       of the prune order if e ≥ 0 (a negative D), else the last (a positive D). The swap is
       applied, and e ← e + D[prune] − D[regrow], if |e| > ``update_threshold`` (and, with
       ``same_sign``, the new e has the sign of the initial e); otherwise the row stops for good.
       At most ``max_cycles`` cycles.

    See the module docstring for the reference's defaults (``same_sign=False`` is what it runs),
    the statistics' normalisation and the invalid-candidate rule.

    Args:
        W: [out, in] weights.
        initial_metric: [out, in] base method's score (higher = keep): Wanda, magnitude, ...
        wanda_metric: [out, in] Wanda score |W| · sqrt(mean x²), ranks the prune candidates.
        mean_x: [in] Σ_tokens x / n_windows (the reference's ``sum_metric_row``).
        var_x: [in] mean over windows of the per-window biased variance of x.
        sparsity: fraction of each row to prune, in [0, 1].
        max_cycles: maximum swap cycles (``max_cycle_time``).
        update_threshold: rows with |e| at or below this stop.
        pow_of_var_regrowing: exponent of var_x in the regrow metric; 0 disables the division.
        same_sign: stop a row when a swap would flip the sign of e (the DSnoT paper's rule; off in
            the reference's run).

    Returns:
        [out, in] bool mask, True = prune; every row prunes exactly ``int(in · sparsity)``.
    """
    _check_stats(W, mean_x, var_x, initial_metric=initial_metric, wanda_metric=wanda_metric)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity: got {sparsity}; allowed: [0, 1]")
    out_f, in_f = W.shape
    k = int(in_f * sparsity)
    n_keep = in_f - k
    order = torch.sort(initial_metric, dim=1, stable=True).indices  # [out, in]
    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=W.device)
    mask.scatter_(1, order[:, :k], True)
    if max_cycles <= 0 or k == 0 or n_keep == 0:
        return mask

    D = W.to(STATS_DTYPE) * mean_x.to(STATS_DTYPE).reshape(1, -1)  # [out, in]
    e, regrow_order = _error_and_regrow_order(D, mask, var_x, pow_of_var_regrowing)
    sign0 = torch.sign(e)  # [out]
    kept_by_score = torch.sort(wanda_metric.masked_fill(mask, float("inf")), dim=1, stable=True)
    kept_by_score = kept_by_score.indices[:, :n_keep]  # [out, n_keep] ascending Wanda
    prune_order = kept_by_score.gather(1, reorder_for_pruning(D.gather(1, kept_by_score)))

    rows = torch.arange(out_f, device=W.device)
    step = torch.tensor([1, -1], device=W.device)  # left pointer moves right, right moves left
    regrow_ptr = torch.tensor([0, in_f - 1], device=W.device).repeat(out_f, 1)  # [out, 2]
    prune_ptr = torch.tensor([0, n_keep - 1], device=W.device).repeat(out_f, 1)  # [out, 2]
    active = torch.ones(out_f, dtype=torch.bool, device=W.device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        side_r = (e > 0).long()  # 1: regrow from the right (largest), 0: from the left
        side_p = (e < 0).long()  # 1: prune from the right (positive D), 0: from the left
        ir, ip = regrow_ptr[rows, side_r], prune_ptr[rows, side_p]
        regrow_ptr[rows, side_r] += step[side_r]
        prune_ptr[rows, side_p] += step[side_p]
        in_range = (ir >= 0) & (ir < in_f) & (ip >= 0) & (ip < n_keep)
        r = regrow_order[rows, ir.clamp(0, in_f - 1)]  # [out]
        p = prune_order[rows, ip.clamp(0, n_keep - 1)]  # [out]
        after = e + D[rows, p] - D[rows, r]
        update = active & (e.abs() > update_threshold) & in_range & mask[rows, r] & ~mask[rows, p]
        if same_sign:
            update &= torch.sign(after) == sign0
        mask[rows[update], p[update]] = True
        mask[rows[update], r[update]] = False
        e = torch.where(update, after, e)
        active = update
    return mask


@torch.no_grad()
def dsnot_nm_mask(
    W: Tensor,
    initial_metric: Tensor,
    mean_x: Tensor,
    var_x: Tensor,
    prunen: int,
    prunem: int,
    *,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
) -> Tensor:
    """N:M DSnoT mask: swaps inside one group of M, so the N:M pattern is kept.

    1. Initial mask: in each group of ``prunem`` consecutive inputs of a row, the ``prunen``
       lowest ``initial_metric`` (stable sort, in float32 as the reference).
    2. e and the regrow order as in `dsnot_mask`.
    3. Each cycle, per active row: regrow the next entry of the regrow order from the right if
       e > 0, else from the left; prune, in that entry's group, the kept weight with the lowest
       ``initial_metric`` that has never been touched (pruned or regrown positions are +inf, as the
       reference marks them). Applied if |e| > ``update_threshold`` and the new e keeps the sign of
       the initial e (the reference's N:M path always checks the sign); otherwise the row stops.

    Args:
        W: [out, in] weights, ``in`` divisible by ``prunem``.
        initial_metric: [out, in] base method's score (higher = keep).
        mean_x: [in] Σ_tokens x / n_windows (the reference's ``sum_metric_row``).
        var_x: [in] mean over windows of the per-window biased variance of x.
        prunen, prunem: prune ``prunen`` of every ``prunem`` consecutive inputs (2:4, 4:8).
        max_cycles: maximum swap cycles.
        update_threshold: rows with |e| at or below this stop.
        pow_of_var_regrowing: exponent of var_x in the regrow metric; 0 disables the division.

    Returns:
        [out, in] bool mask, True = prune; exactly ``prunen`` per group of ``prunem``.
    """
    _check_stats(W, mean_x, var_x, initial_metric=initial_metric)
    out_f, in_f = W.shape
    if not (prunem > 0 and 0 <= prunen <= prunem and in_f % prunem == 0):
        raise ValueError(
            f"N:M pattern: got {prunen}:{prunem} for {in_f} inputs; need 0 ≤ N ≤ M and M dividing in"
        )
    groups = initial_metric.to(torch.float32).reshape(out_f, in_f // prunem, prunem)
    lowest = torch.sort(groups, dim=2, stable=True).indices[..., :prunen]  # [out, G, N]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(out_f, in_f)
    if max_cycles <= 0 or prunen == 0 or prunen == prunem:
        return mask

    D = W.to(STATS_DTYPE) * mean_x.to(STATS_DTYPE).reshape(1, -1)  # [out, in]
    e, regrow_order = _error_and_regrow_order(D, mask, var_x, pow_of_var_regrowing)
    sign0 = torch.sign(e)  # [out]
    blocked = initial_metric.to(torch.float32).masked_fill(mask, float("inf"))  # [out, in]

    rows = torch.arange(out_f, device=W.device)
    step = torch.tensor([1, -1], device=W.device)
    offsets = torch.arange(prunem, device=W.device)
    regrow_ptr = torch.tensor([0, in_f - 1], device=W.device).repeat(out_f, 1)  # [out, 2]
    active = torch.ones(out_f, dtype=torch.bool, device=W.device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        side = (e > 0).long()
        ir = regrow_ptr[rows, side]
        regrow_ptr[rows, side] += step[side]
        in_range = (ir >= 0) & (ir < in_f)
        r = regrow_order[rows, ir.clamp(0, in_f - 1)]  # [out]
        start = r - r % prunem
        lowest_val, lowest_pos = torch.topk(blocked.gather(1, start[:, None] + offsets), 1, largest=False)
        p = start + lowest_pos[:, 0]  # [out]
        after = e + D[rows, p] - D[rows, r]
        update = (
            active
            & (torch.sign(after) == sign0)
            & (e.abs() > update_threshold)
            & in_range
            & mask[rows, r]
            & torch.isfinite(lowest_val[:, 0])
        )
        blocked[rows[update], p[update]] = float("inf")
        mask[rows[update], p[update]] = True
        mask[rows[update], r[update]] = False
        e = torch.where(update, after, e)
        active = update
    return mask


def initial_metric(W: Tensor, stats, method) -> Tensor:
    """The base method's score that seeds DSnoT's mask (reference `prune_DSnoT`).

    Score methods use their score; solver methods (SparseGPT, APT) use SparseGPT's saliency
    w² / [U]_jj² with U the upper Cholesky factor of the damped H⁻¹, or their own (`Method.saliency`,
    D²Prune's), and are not reconstructed (the reference only masks).
    """
    if method.score is not None:
        return method.score(W, stats)
    if method.saliency is not None:
        return method.saliency(W, stats)
    from neuroal.solvers.hessian import prepare

    W32, U = prepare(W, stats.hessian, 0.01)
    return W32**2 / torch.diag(U).reshape(1, -1) ** 2


@REFINERS.register("dsnot")
@dataclass(frozen=True)
class DSnoT(Refiner):
    """DSnoT on top of the base method's mask: `neuroal prune --top-up dsnot` (grid knobs `dsnot_*`).

    Attributes:
        max_cycles, update_threshold, pow_of_var_regrowing: the reference's defaults (50, 0.1, 1).
        same_sign: the DSnoT paper's rule, which the reference code never applies (see above).
        skip_mlp: the reference refines attention linears only; MLP linears get the initial mask.
    """

    max_cycles: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    same_sign: bool = False
    skip_mlp: bool = True

    needs = frozenset({NORMS, MOMENTS})
    knobs = {"max_cycles": "dsnot_cycles", "update_threshold": "dsnot_threshold", "same_sign": "dsnot_same_sign",
             "skip_mlp": "dsnot_skip_mlp"}

    @torch.no_grad()
    def prune(self, W: Tensor, stats, ratio, method, *, pattern=None, is_mlp: bool = False) -> Tensor:
        """New weights: DSnoT's mask (only its initial mask on a skipped MLP linear) applied to W."""
        if isinstance(ratio, Tensor):
            raise ValueError("DSnoT takes one sparsity per layer, not per-row ratios")
        metric = initial_metric(W, stats, method)
        cycles = 0 if (self.skip_mlp and is_mlp) else self.max_cycles
        kw = dict(max_cycles=cycles, update_threshold=self.update_threshold,
                  pow_of_var_regrowing=self.pow_of_var_regrowing)
        if pattern is not None:
            mask = dsnot_nm_mask(W, metric, stats.mean_x, stats.var_x, pattern.n, pattern.m, **kw)
        else:
            mask = dsnot_mask(W, metric, wanda(W, stats), stats.mean_x, stats.var_x, float(ratio),
                              same_sign=self.same_sign, **kw)
        return W.masked_fill(mask, 0)
