"""Per-linear input statistics, accumulated by forward hooks as running means (no activations kept).

The accumulation replays the reference code's arithmetic window by window: Wanda's `WrappedGPT`
and SparseGPT's `add_batch` (as in eliacunegatti/NeuroAL `lib/layerwrapper.py`, `lib/sparsegpt.py`).
A block call sees [b, seqlen, in] inputs for b windows; each window updates the running means with
the same formula, in the same order, as the reference's one-window-per-call loop. The statistics,
and so every mask and NeuroAL score, are then bit-identical to the reference arithmetic: the
NeuroAL argmin is sensitive to float noise (one near-tie mask flip changes later blocks' scores at
the 1% level, more than the gap between neighbouring λ), so "the same choices" needs the same sums.

Normalisation is per window, as the reference: `scaler_row` = Σ_windows ‖x_w‖² / n_windows and the
Wanda input norm a = sqrt(scaler_row); `mean_x` (DSnoT's `sum_metric_row`) = Σ_tokens x / n_windows.

One reference quirk is reproduced on purpose: its SparseGPT wrapper keeps `scaler_row` of the
*scaled* input √(2/n)·x, so window k of N weighs 2/(k·N) instead of 1/N. NeuroAL's search with
SparseGPT reads its activation norms from there (`get_forward_sparsegpt`); `HESSIAN_NORMS` is that
statistic, used for solver methods' alignment metric by default.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

STATS_DTYPE = torch.float32

NORMS = "norms"  # WrappedGPT scaler_row (Wanda, multiflow, OWL, NeuroAL metric)
MOMENTS = "moments"  # WrappedGPT sum_metric_row, mean, var (DSnoT)
HESSIAN = "hessian"  # SparseGPT H = 2XᵀX/n (SparseGPT, APT)
HESSIAN_NORMS = "hessian_norms"  # SparseGPT wrapper's scaler_row (NeuroAL metric with solvers)


@dataclass
class LinearStats:
    """Running statistics over the inputs x [*, in] of one linear."""

    n_windows: int = 0
    n_tokens: int = 0
    scaler_row: Tensor | None = None  # [in]
    sum_metric_row: Tensor | None = None  # [in]
    mean: Tensor | None = None  # [in, 1]
    var: Tensor | None = None  # [in, 1]
    H: Tensor | None = None  # [in, in]
    scaler_row_h: Tensor | None = None  # [in]
    kinds: frozenset = field(default_factory=frozenset)

    def _zeros(self, cols: int, device) -> None:
        if self.scaler_row is None:
            z = lambda *shape: torch.zeros(shape, dtype=STATS_DTYPE, device=device)  # noqa: E731
            self.scaler_row, self.sum_metric_row, self.scaler_row_h = z(cols), z(cols), z(cols)
            self.mean, self.var = z(cols, 1), z(cols, 1)
            if HESSIAN in self.kinds:
                self.H = z(cols, cols)

    def add(self, x: Tensor) -> None:
        """x: [b, seqlen, in] (b windows) or [b, in] (one token per window)."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        self._zeros(x.shape[-1], x.device)
        for w in range(x.shape[0]):
            self._add_window(x[w])

    def _add_window(self, x: Tensor) -> None:
        inp = x.reshape(-1, x.shape[-1]).t().to(STATS_DTYPE)  # [in, tokens], as the reference
        n, k = self.n_windows, inp.shape[1]
        if MOMENTS in self.kinds:  # WrappedGPT.add_batch
            mean = torch.mean(inp, dim=1, keepdim=True)
            var = torch.var(inp, dim=1, unbiased=False, keepdim=True)
            t = self.n_tokens
            self.var = var if t == 0 else (self.var * t + var * k) / (t + k)
            self.mean = mean if t == 0 else (self.mean * t + mean * k) / (t + k)
            self.sum_metric_row *= n / (n + 1)
            self.sum_metric_row += torch.sum(inp, dim=1) / (n + 1)
        if NORMS in self.kinds:
            self.scaler_row *= n / (n + 1)
            self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / (n + 1)
        if HESSIAN in self.kinds or HESSIAN_NORMS in self.kinds:  # SparseGPT.add_batch
            scaled = math.sqrt(2 / (n + 1)) * inp
            if HESSIAN in self.kinds:
                self.H *= n / (n + 1)
                self.H += scaled.matmul(scaled.t())
            self.scaler_row_h *= n / (n + 1)
            self.scaler_row_h += torch.norm(scaled, p=2, dim=1) ** 2 / (n + 1)
        self.n_windows += 1
        self.n_tokens += k

    def copy_from(self, other: "LinearStats") -> None:
        """Take `other`'s state (a linear that saw the very same inputs)."""
        for f in fields(self):
            v = getattr(other, f.name)
            setattr(self, f.name, v.clone() if isinstance(v, Tensor) else v)

    @property
    def norms(self) -> Tensor:
        """Wanda input norm a [in]."""
        return torch.sqrt(self.scaler_row)

    @property
    def hessian_norms(self) -> Tensor:
        """sqrt of the SparseGPT wrapper's scaler_row (the reference's quirk, see the module doc)."""
        return torch.sqrt(self.scaler_row_h)

    @property
    def mean_x(self) -> Tensor:
        """DSnoT's `sum_metric_row`: Σ_tokens x / n_windows."""
        return self.sum_metric_row

    @property
    def var_x(self) -> Tensor:
        return self.var.reshape(-1)

    @property
    def hessian(self) -> Tensor:
        """H = 2 XᵀX / n_windows, as SparseGPT."""
        return self.H


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
    # Linears called on the same tensor object (q, k and v; gate and up) get the same statistics:
    # the first computes them, the others copy its new state. A linear copies only while it has
    # received every one of the source's inputs since the start (its `twin`), so its state before
    # the call equals the source's state before the call. Halves the statistics work of a block.
    last = {"x": None, "version": -1, "name": None, "prior": -1}
    twin: dict[str, str | None] = {}

    def make(name):
        def hook(_module, args):
            x, st = args[0], stats[name]
            src = last["name"]
            same = x is last["x"] and x._version == last["version"] and st.n_windows == last["prior"]
            if same and twin.get(name, src if st.n_windows == 0 else None) == src:
                twin[name] = src
                st.copy_from(stats[src])
            else:
                twin[name] = None
                last.update(x=x, version=x._version, name=name, prior=st.n_windows)
                st.add(x.detach())
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
        last.clear()
        for h in handles:
            h.remove()
