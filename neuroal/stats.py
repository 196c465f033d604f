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

D²Prune (`D2_NORMS`) keeps what its reference wrappers (cquxl/D2Prune `prune/d2prune_utils.py`,
`D2SparseGPT.add_batch`, `D2Wanda.add_batch`) keep: per-window L2 norms (not squared) of each input
channel and of each *output* channel y = Wx + b, accumulated with their recurrence
v ← v·n/(n+1) + ‖·‖ (window k of N weighs k/N, not 1/N; reproduced as is). `x_l2` is the D2Wanda
statistic (the raw input), `x_l2_h` the D2SparseGPT one (the input scaled by √(2/n) first, as for
its Hessian), `y_l2` the output's; the reference's division by its scale s happens in the score
(`neuroal.solvers.d2prune`). Output norms come from forward hooks (for a linear used through its
weight, or an expert's matrix, the output is recomputed from the input the hook sees).

Experts (mixture-of-experts blocks). Each expert's matrices get statistics from the inputs that
expert actually receives: its routed tokens (those whose top-k choice includes it) for gate_up,
and for down its intermediate activations act(gate)·up on those tokens (recomputed in the hook
with the expert's current gate_up weights, as the model computes them). The window rule: every
calibration window counts once for every expert, also when it routes no token there (it adds
zeros), so `scaler_row` = Σ_routed tokens ‖x‖² / n_windows: the dense formula for a linear whose
input is zero on the tokens not routed to it. Wanda, SparseGPT's damping and NeuroAL's metric are
invariant to that scale; routing weights are not applied (the expert's input is unweighted).
Calibrating an expert on all tokens (`ExpertRule.calibrate_all`, or the fallback for an expert
routed fewer than `ExpertRule.min_tokens` tokens) is the dense formula over every token.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from neuroal.errors import SpecError
from neuroal.prunable import ExpertMatrix

STATS_DTYPE = torch.float32

NORMS = "norms"  # WrappedGPT scaler_row (Wanda, multiflow, OWL, NeuroAL metric)
MOMENTS = "moments"  # WrappedGPT sum_metric_row, mean, var (DSnoT)
HESSIAN = "hessian"  # SparseGPT H = 2XᵀX/n (SparseGPT, APT)
HESSIAN_NORMS = "hessian_norms"  # SparseGPT wrapper's scaler_row (NeuroAL metric with solvers)
D2_NORMS = "d2_norms"  # D²Prune wrappers' input and output channel norms (x_l2, x_l2_h, y_l2)


_OWN_OUTPUT = ("y_l2", "n_out_windows")


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
    x_l2: Tensor | None = None  # [in]  D2Wanda's delta_x_scaler_row · s
    x_l2_h: Tensor | None = None  # [in]  D2SparseGPT's delta_x_scaler_row · s
    y_l2: Tensor | None = None  # [out] y_scaler_col · s (the linear's own output: never copied from a twin)
    n_out_windows: int = 0
    kinds: frozenset = field(default_factory=frozenset)

    def _zeros(self, cols: int, device) -> None:
        if self.scaler_row is None:
            z = lambda *shape: torch.zeros(shape, dtype=STATS_DTYPE, device=device)  # noqa: E731
            self.scaler_row, self.sum_metric_row, self.scaler_row_h = z(cols), z(cols), z(cols)
            self.mean, self.var = z(cols, 1), z(cols, 1)
            if HESSIAN in self.kinds:
                self.H = z(cols, cols)
            if D2_NORMS in self.kinds:
                self.x_l2, self.x_l2_h = z(cols), z(cols)

    def add(self, x: Tensor) -> None:
        """x: [b, seqlen, in] (b windows) or [b, in] (one token per window)."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        self._zeros(x.shape[-1], x.device)
        for w in range(x.shape[0]):
            self._add_window(x[w])

    def add_window(self, x: Tensor) -> None:
        """One window's tokens x [tokens, in]; none (an expert this window routes nothing to) counts too."""
        self._zeros(x.shape[-1], x.device)
        self._add_window(x)

    def _add_window(self, x: Tensor) -> None:
        inp = x.reshape(-1, x.shape[-1]).t().to(STATS_DTYPE)  # [in, tokens], as the reference
        n, k = self.n_windows, inp.shape[1]
        if MOMENTS in self.kinds and k:  # WrappedGPT.add_batch (a window without tokens leaves mean, var)
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
        if D2_NORMS in self.kinds:  # D2Wanda / D2SparseGPT add_batch (the latter's x scaled by √(2/(n+1)))
            l2 = torch.norm(inp, p=2, dim=1)
            self.x_l2 *= n / (n + 1)
            self.x_l2 += l2
            self.x_l2_h *= n / (n + 1)
            self.x_l2_h += math.sqrt(2 / (n + 1)) * l2
        self.n_windows += 1
        self.n_tokens += k

    def add_output(self, y: Tensor) -> None:
        """The linear's output y: [b, seqlen, out] (b windows) or [b, out]; D2_NORMS only."""
        if y.dim() == 2:
            y = y.unsqueeze(1)
        for w in range(y.shape[0]):
            self.add_output_window(y[w])

    def add_output_window(self, y: Tensor) -> None:
        """One window's outputs y [tokens, out] (none: the window still counts)."""
        out = y.reshape(-1, y.shape[-1]).to(STATS_DTYPE)  # [tokens, out]
        n = self.n_out_windows
        if self.y_l2 is None:
            self.y_l2 = torch.zeros(out.shape[1], dtype=STATS_DTYPE, device=out.device)
        self.y_l2 *= n / (n + 1)
        self.y_l2 += torch.norm(out, p=2, dim=0)
        self.n_out_windows += 1

    def copy_from(self, other: "LinearStats") -> None:
        """Take `other`'s input state (a linear that saw the very same inputs); output sums stay its own."""
        for f in fields(self):
            if f.name in _OWN_OUTPUT:
                continue
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


@dataclass(frozen=True)
class ExpertRule:
    """Which tokens an expert's statistics come from (mixture-of-experts blocks).

    By default its routed tokens (what it sees at inference); an expert routed fewer than
    `min_tokens` calibration tokens in a block is calibrated on all the block's tokens instead,
    as if every token were routed to it (a second pass over the block for those experts only),
    and recorded as such. `calibrate_all` calibrates every expert on all tokens (llm-compressor's
    `calibrate_all_experts`); the model's outputs never change, only the statistics.

    Attributes:
        calibrate_all: every expert's statistics over all tokens.
        min_tokens: fewest routed tokens an expert's own statistics need (>= 1: with none, its
            norms are zero and its Hessian singular).
    """

    calibrate_all: bool = False
    min_tokens: int = 1

    def __post_init__(self):
        if int(self.min_tokens) < 1:
            raise SpecError("--moe-min-tokens", self.min_tokens, "an integer >= 1")


class StopForward(Exception):
    """Raised by a hook once the last needed statistic is recorded (skips the rest of the block)."""


@contextlib.contextmanager
def collect(
    linears: dict[str, nn.Module],
    kinds: frozenset,
    *,
    stop_after: str | None = None,
    input_from: dict[str, tuple[str, int, int]] | None = None,
    all_tokens: dict[int, frozenset] | None = None,
    routed: dict | None = None,
):
    """Accumulate `LinearStats` for each linear while the context is open.

    Args:
        linears: name -> module to hook, or an `ExpertMatrix` (hooked through its experts module).
        kinds: which sums to keep (NORMS, MOMENTS, HESSIAN, HESSIAN_NORMS, D2_NORMS).
        stop_after: if set, the hook on this linear raises StopForward after recording, so a
            forward whose output is not needed stops before computing it.
        input_from: linear -> (source linear, first column, width) for linears the block uses
            through their weight without calling them: their input is that slice of the source's
            output (recorded by a forward hook on the source).
        all_tokens: experts module id -> experts whose statistics take every token (the others
            take their routed tokens; see the module doc).
        routed: if given, filled with experts module id -> [E] int64 counts of routed tokens.

    Yields:
        dict name -> LinearStats, filled as forwards run.
    """
    stats = {name: LinearStats(kinds=frozenset(kinds)) for name in linears}
    handles = []
    outputs = D2_NORMS in kinds  # output sums too: the last linear stops the block after its forward
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
            if name == stop_after and not outputs:
                raise StopForward

        return hook

    def make_out(name):
        def hook(_module, _args, output):
            stats[name].add_output(output.detach())
            if name == stop_after:
                raise StopForward

        return hook

    derived = input_from or {}

    def make_derived(name, start, width):
        def hook(_module, _args, output):
            x = output.detach()[..., start : start + width]
            stats[name].add(x)
            if outputs:  # the linear is used through its weight: its output recomputed from that input
                lin = linears[name]
                stats[name].add_output(F.linear(x, lin.weight, lin.bias))

        return hook

    experts: dict[int, dict[str, ExpertMatrix]] = {}
    for name, module in linears.items():
        if isinstance(module, ExpertMatrix):
            experts.setdefault(id(module.experts), {})[name] = module
        elif name in derived:
            src, start, width = derived[name]
            handles.append(linears[src].register_forward_hook(make_derived(name, start, width)))
        else:
            handles.append(module.register_forward_pre_hook(make(name)))
            if outputs:
                handles.append(module.register_forward_hook(make_out(name)))
    for key, units in experts.items():
        handles.extend(_hook_experts(units, stats, (all_tokens or {}).get(key, frozenset()), routed, key,
                                     stop=stop_after in units, outputs=outputs))
    try:
        yield stats
    finally:
        last.clear()
        for h in handles:
            h.remove()


def _hook_experts(units: dict[str, ExpertMatrix], stats: dict, everyone: frozenset, routed: dict | None, key: int,
                  stop: bool, outputs: bool = False) -> list:
    """Hooks feeding one experts module's units their tokens, window by window.

    A pre-hook on the MoE block reads the window length (it gets [b, seqlen, d]); one on the
    experts module reads the flattened tokens [b·seqlen, d] and their top-k experts [b·seqlen, k].
    """
    first = next(iter(units.values()))
    spec = first.spec
    wanted: dict[int, dict[str, str]] = {}  # expert -> {"gate_up" | "down": unit name}
    for name, unit in units.items():
        wanted.setdefault(unit.index, {})["gate_up" if unit.is_gate_up else "down"] = name
    shape = {}

    def on_moe(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        shape["seqlen"] = hidden.shape[1] if hidden.dim() == 3 else 1

    def on_experts(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach()  # [T, d], T = b·seqlen
        top_k = (args[1] if len(args) > 1 else kwargs["top_k_index"]).detach()  # [T, k]
        n_experts, seqlen = getattr(module, spec.gate_up).shape[0], shape["seqlen"]
        hit = F.one_hot(top_k.long(), n_experts).sum(dim=1).bool()  # [T, E]: token t is routed to e
        if routed is not None:
            counts = hit.sum(dim=0).cpu()
            routed[key] = counts if key not in routed else routed[key] + counts
        per_window = hit.reshape(-1, seqlen, n_experts).sum(dim=1).t().tolist()  # [E][windows] routed counts
        for e, names in sorted(wanted.items()):
            if e in everyone:
                xe, sizes = x, [seqlen] * (x.shape[0] // seqlen)
            else:
                xe, sizes = x[hit[:, e]], per_window[e]  # routed tokens in order, window by window
            if "gate_up" in names:
                for chunk in xe.split(sizes):
                    stats[names["gate_up"]].add_window(chunk)
                if outputs:  # [n_e, 2·inter], before the activation, as a linear's output
                    for chunk in F.linear(xe, getattr(module, spec.gate_up).data[e]).split(sizes):
                        stats[names["gate_up"]].add_output_window(chunk)
            if "down" in names:
                h = module._apply_gate(F.linear(xe, getattr(module, spec.gate_up).data[e]))  # [n_e, inter]
                for chunk in h.split(sizes):
                    stats[names["down"]].add_window(chunk)
                if outputs:
                    for chunk in F.linear(h, getattr(module, spec.down).data[e]).split(sizes):
                        stats[names["down"]].add_output_window(chunk)
        if stop:
            raise StopForward

    return [first.moe.register_forward_pre_hook(on_moe, with_kwargs=True),
            first.experts.register_forward_pre_hook(on_experts, with_kwargs=True)]
