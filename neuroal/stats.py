"""Per-linear input statistics, accumulated by forward hooks as running sums (no activations kept).

Normalisation follows the reference code (Wanda's `WrappedGPT`, SparseGPT's `add_batch`): sums are
divided by the number of calibration *windows*, not tokens. So `scaler_row` = Σ_tokens x² / n_windows
and the Wanda input norm a = sqrt(scaler_row); every consumer of a (Wanda, multiflow, the NeuroAL
metric, which normalises by Σa) is invariant to that constant, and DSnoT's threshold expects it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

STATS_DTYPE = torch.float32

NORMS = "norms"  # Σ x² per input channel (Wanda, multiflow, OWL, NeuroAL metric)
MOMENTS = "moments"  # Σ x and Σ per-window variance (DSnoT)
HESSIAN = "hessian"  # Σ x xᵀ (SparseGPT, APT)


@dataclass
class LinearStats:
    """Running sums over the inputs x [*, in] of one linear."""

    n_windows: int = 0
    sum_sq: Tensor | None = None  # [in]
    sum_x: Tensor | None = None  # [in]
    sum_var: Tensor | None = None  # [in] Σ over windows of each window's biased variance
    xtx: Tensor | None = None  # [in, in]
    kinds: frozenset = field(default_factory=frozenset)

    def add(self, x: Tensor) -> None:
        """x: [b, seqlen, in] (b windows) or [b, in] (one token per window)."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        b = x.shape[0]
        x = x.to(STATS_DTYPE)
        flat = x.reshape(-1, x.shape[-1])
        if NORMS in self.kinds:
            s = flat.square().sum(0)
            self.sum_sq = s if self.sum_sq is None else self.sum_sq + s
        if MOMENTS in self.kinds:
            sx = flat.sum(0)
            sv = x.var(dim=1, unbiased=False).sum(0)
            self.sum_x = sx if self.sum_x is None else self.sum_x + sx
            self.sum_var = sv if self.sum_var is None else self.sum_var + sv
        if HESSIAN in self.kinds:
            h = flat.T @ flat
            self.xtx = h if self.xtx is None else self.xtx.add_(h)
        self.n_windows += b

    @property
    def scaler_row(self) -> Tensor:
        return self.sum_sq / self.n_windows

    @property
    def norms(self) -> Tensor:
        """Wanda input norm a [in]."""
        return torch.sqrt(self.scaler_row)

    @property
    def mean_x(self) -> Tensor:
        """DSnoT's `sum_metric_row`: Σ_tokens x / n_windows."""
        return self.sum_x / self.n_windows

    @property
    def var_x(self) -> Tensor:
        return self.sum_var / self.n_windows

    @property
    def hessian(self) -> Tensor:
        """H = 2 XᵀX / n_windows, as SparseGPT."""
        return self.xtx * (2.0 / self.n_windows)


class StopForward(Exception):
    """Raised by a hook once the last needed statistic is recorded (skips the rest of the block)."""


@contextlib.contextmanager
def collect(
    linears: dict[str, nn.Module],
    kinds: frozenset,
    *,
    stop_after: str | None = None,
    input_from: dict[str, tuple[str, int, int]] | None = None,
):
    """Accumulate `LinearStats` for each linear while the context is open.

    Args:
        linears: name -> module to hook.
        kinds: which sums to keep (NORMS, MOMENTS, HESSIAN).
        stop_after: if set, the hook on this linear raises StopForward after recording, so a
            forward whose output is not needed stops before computing it.
        input_from: linear -> (source linear, first column, width) for linears the block uses
            through their weight without calling them: their input is that slice of the source's
            output (recorded by a forward hook on the source).

    Yields:
        dict name -> LinearStats, filled as forwards run.
    """
    stats = {name: LinearStats(kinds=frozenset(kinds)) for name in linears}
    handles = []

    def make(name):
        def hook(_module, args):
            stats[name].add(args[0].detach())
            if name == stop_after:
                raise StopForward

        return hook

    derived = input_from or {}

    def make_derived(name, start, width):
        def hook(_module, _args, output):
            stats[name].add(output.detach()[..., start : start + width])

        return hook

    for name, module in linears.items():
        if name in derived:
            src, start, width = derived[name]
            handles.append(linears[src].register_forward_hook(make_derived(name, start, width)))
        else:
            handles.append(module.register_forward_pre_hook(make(name)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
