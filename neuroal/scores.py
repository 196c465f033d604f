"""Importance scores of the score-based methods (higher = keep).

- magnitude: |W|.
- Wanda (Sun et al. 2024): |W| · a, a_j the input norm of channel j (broadcast over rows).
- multiflow (Iurada et al. 2024): |W| ⊙ (imp_out ⊗ imp_in), imp_out = row-mean of |W|·a,
  imp_in = column-mean of |W|·a (as NeuroAL's reference `prune_multiflow`).
- RIA (Zhang et al., ICLR 2024): (|W_ij| / Σ_i|W_ij| + |W_ij| / Σ_j|W_ij|) · a_j^0.5.

The functions are registered once, as methods, in `neuroal.methods.METHODS`; `SCORES` is the view
of the score-based entries there, by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from neuroal.errors import SpecError
from neuroal.stats import LinearStats

ScoreFn = Callable[[Tensor, "LinearStats | None"], Tensor]

RIA_A = 0.5  # exponent of the input norm (the reference's `--a` default)


def magnitude(W: Tensor, stats: LinearStats | None = None) -> Tensor:
    """|W| [out, in]; needs no calibration data."""
    return W.abs().to(torch.float32)


def wanda(W: Tensor, stats: LinearStats) -> Tensor:
    """|W| · a [out, in]."""
    return W.abs().to(torch.float32) * stats.norms.reshape(1, -1)


def multiflow(W: Tensor, stats: LinearStats) -> Tensor:
    """|W| ⊙ (imp_out ⊗ imp_in) [out, in]."""
    A = W.abs().to(torch.float32)
    S = A * stats.norms.reshape(1, -1)
    return A * torch.outer(S.mean(dim=1), S.mean(dim=0))


def ria(W: Tensor, stats: LinearStats, *, a: float = RIA_A) -> Tensor:
    """RIA, relative importance and activations [out, in]: `neuroal prune --method ria`.

    Paper: Y. Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large
    Language Models", ICLR 2024. Reference: biomedical-cybernetics/Relative-importance-and-
    activation-pruning, `lib/prune.py` `prune_ria`:

        RI_ij = |W_ij| / Σ_i |W_ij|  +  |W_ij| / Σ_j |W_ij|     (its column sum, then its row sum)
        score = RI_ij · (‖X_j‖₂)^a,  ‖X_j‖₂ = sqrt(scaler_row_j) = a_j (Wanda's input norm), a = 0.5

    Where this differs from the reference, and why:

    - Mask: the reference's default (`--per_outneuron` off) is one threshold per layer,
      ``sort(score)[int(numel · s)]`` and ``score <= thresh`` (so one weight more than
      ``numel · s``, plus ties). Here RIA follows the project's mask rules like the other score
      methods: per output row by default (its `--per_outneuron`), `--granularity layer` for one
      exact-count threshold per layer, per-row ratios from the NeuroAL row step.
    - N:M: the reference's default is direct N:M on the score (what this does). Its optional
      channel permutation (`--reallocation`, `--lsa`) is not done: it chooses the N:M groups in a
      permuted column order, so the mask is N:M only after permuting the layer's input channels,
      which a saved checkpoint can express only by also permuting the producing layer's outputs
      (the reference keeps the permuted layout for its sparse kernel only, "under testing").
    - A column or row whose |W| sums to zero scores 0 (the reference divides 0 by 0).

    Args:
        W: [out, in] weights.
        stats: its `LinearStats` with NORMS.
        a: exponent of the input norm.
    """
    A = W.abs().to(torch.float32)
    col = A.sum(dim=0, keepdim=True)  # [1, in]  Σ_i |W_ij|
    row = A.sum(dim=1, keepdim=True)  # [out, 1] Σ_j |W_ij|
    RI = A / torch.where(col == 0, 1.0, col) + A / torch.where(row == 0, 1.0, row)
    return RI * stats.norms.reshape(1, -1) ** a


class _Scores:
    """The score functions of the score-based methods in `neuroal.methods.METHODS`, by name."""

    kind = "score"

    @staticmethod
    def _methods():
        from neuroal.methods import METHODS  # it imports this module

        return METHODS

    def names(self) -> list[str]:
        M = self._methods()
        return [n for n in M.names() if M.get(n).score is not None]

    def get(self, name: str) -> ScoreFn:
        method = self._methods().get(name)
        if method.score is None:
            raise SpecError(self.kind, name, ", ".join(self.names()))
        return method.score

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except SpecError:
            return False
        return True


SCORES = _Scores()
