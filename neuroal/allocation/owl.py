"""OWL (Yin et al., ICML 2024): block sparsity from the outlier ratio of the block's Wanda scores.

D = 100 · #(scores > M · mean(scores)) / #scores over all prunable linears of a block, scores =
Wanda |W| · a on the dense model's inputs; blocks with more outliers keep more weights
(`neuroal.allocation.schedule.owl_block_sparsity`, λ = 0.08).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from neuroal.allocation import ratios as R
from neuroal.allocation.base import ALLOCATORS, Allocation, AllocationProblem, Allocator, Evidence
from neuroal.allocation.schedule import owl_block_sparsity
from neuroal.scores import wanda
from neuroal.stats import NORMS


def outlier_ratio(weights: Mapping[str, Tensor], stats: Mapping, m: float) -> float:
    """OWL's D of one block, in percent."""
    scores = torch.cat([wanda(W, stats[name]).flatten() for name, W in weights.items()])
    return float((scores > scores.mean() * m).sum().item()) / scores.numel() * 100


@ALLOCATORS.register("owl")
@dataclass(frozen=True)
class OWL(Allocator):
    """OWL: `neuroal prune --top-up owl` (grid knobs `owl_m`, `owl_lambda`).

    The dense pass runs on all calibration windows, as the reference.
    """

    m: float = 5.0
    lam: float = 0.08

    evidence = Evidence.BLOCK_STATS
    stats_kinds = frozenset({NORMS})
    knobs = {"m": "owl_m", "lam": "owl_lambda"}
    summary = "OWL: block sparsity from the Wanda outlier ratio (M=5, λ=0.08)"

    def block_summary(self, weights, stats) -> float:
        return outlier_ratio(weights, stats, self.m)

    def allocate(self, problem: AllocationProblem, evidence: Sequence[float]) -> Allocation:
        d = [float(x) for x in evidence]
        block_s = owl_block_sparsity(d, problem.sparsity, self.lam)
        return Allocation(R.per_block(block_s, problem.linears), extra={"owl_outlier_ratio": d})
