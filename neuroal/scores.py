"""Importance scores of the score-based methods (higher = keep).

- magnitude: |W|.
- Wanda (Sun et al. 2024): |W| · a, a_j the input norm of channel j (broadcast over rows).
- multiflow (Iurada et al. 2024): |W| ⊙ (imp_out ⊗ imp_in), imp_out = row-mean of |W|·a,
  imp_in = column-mean of |W|·a (as NeuroAL's reference `prune_multiflow`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from neuroal.registry import Registry
from neuroal.stats import LinearStats

ScoreFn = Callable[[Tensor, "LinearStats | None"], Tensor]
SCORES: Registry[ScoreFn] = Registry("score")


@SCORES.register("magnitude")
def magnitude(W: Tensor, stats: LinearStats | None = None) -> Tensor:
    """|W| [out, in]; needs no calibration data."""
    return W.abs().to(torch.float32)


@SCORES.register("wanda")
def wanda(W: Tensor, stats: LinearStats) -> Tensor:
    """|W| · a [out, in]."""
    return W.abs().to(torch.float32) * stats.norms.reshape(1, -1)


@SCORES.register("multiflow")
def multiflow(W: Tensor, stats: LinearStats) -> Tensor:
    """|W| ⊙ (imp_out ⊗ imp_in) [out, in]."""
    A = W.abs().to(torch.float32)
    S = A * stats.norms.reshape(1, -1)
    return A * torch.outer(S.mean(dim=1), S.mean(dim=0))
