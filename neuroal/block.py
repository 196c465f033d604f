"""The unit of work: one decoder block, its inputs, and per-linear ratios.

Every path (the in-process run, each Ray shard, the NeuroAL search, evaluation) calls these
functions and nothing else prunes. Inputs are all calibration windows of a stream at once,
[n, seqlen, d]; forwards run in micro-batches of at most `max_tokens` tokens (memory bound, not a
per-window loop), and statistics are running sums kept by hooks.

- `forward_block`:   hidden -> block(hidden) (evaluation, dense propagation).
- `dense_block`:     dense statistics summarised for an allocator (OWL) and the dense output.
- `prune_block`:     dense statistics -> prune in place -> sparse output (the final pass).
- `score_block`:     NeuroAL candidate: dense stats -> prune a working copy -> sparse stats and
                     output -> per-linear alignment metric; the block's weights are restored.

"Linear" here means a prunable unit (`prunable.block_linears`): a block's `nn.Linear`, or one
expert's matrix of a fused mixture-of-experts parameter (an `ExpertMatrix`). Which tokens an
expert's statistics come from is `PruneOptions.experts` (`stats.ExpertRule`); each result records
it per block in `BlockResult.experts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neuroal import stats as S
from neuroal.block_forward import call_block
from neuroal.families import Family
from neuroal.methods import METHODS, Method, Pattern, prune_linear
from neuroal.prunable import ExpertMatrix, block_linears
from neuroal.refiners import Refiner

logger = logging.getLogger(__name__)

# Tokens per block call. On CPUs small micro-batches win: a block's intermediates for ~2k tokens stay
# in cache (measured on SmolLM2: 64 windows x 512 run 1.39x faster in 2k-token calls than in 32k);
# on GPUs large batches fill the device.
DEFAULT_MAX_TOKENS = None
MAX_TOKENS = {"cpu": 2048, "cuda": 32768}


DEFAULT_EXPERT_RULE = S.ExpertRule()  # routed tokens; all tokens for an expert none is routed to


def max_tokens_for(device: torch.device, max_tokens: int | None) -> int:
    return max_tokens or MAX_TOKENS.get(device.type, 32768)


@dataclass(frozen=True)
class PruneOptions:
    """How each linear of a block is pruned (ratios come separately, per block and linear)."""

    method: str = "wanda"
    pattern: Pattern | None = None
    granularity: str = "row"
    blocksize: int = 128
    percdamp: float = 0.01
    refiner: Refiner | None = None  # a mask refiner stage (DSnoT) replacing the base method's masks
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    experts: S.ExpertRule = field(default_factory=S.ExpertRule)  # which tokens each expert is calibrated on (MoE)

    @property
    def base(self) -> Method:
        return METHODS.get(self.method)

    @property
    def needs(self) -> frozenset:
        return frozenset(self.base.needs) | (self.refiner.needs if self.refiner is not None else frozenset())


@dataclass(frozen=True)
class ExpertCalibration:
    """How the experts of one experts module were calibrated in a block (run.json, per block).

    Attributes:
        routed_tokens: per expert, the calibration tokens the router sent to it (top-k choices).
        all_tokens: experts whose statistics came from every token of the block: all of them
            with `ExpertRule.calibrate_all`, else those routed fewer than `min_tokens` tokens.
        rule: the rule in words.
    """

    routed_tokens: tuple[int, ...]
    all_tokens: tuple[int, ...]
    rule: str


@dataclass
class BlockResult:
    """What one block returns to the stream driver (small; the hidden states travel separately)."""

    metric: dict[str, float] = field(default_factory=dict)  # NeuroAL alignment per linear
    alignment: dict[str, Tensor] = field(default_factory=dict)  # a^d - a^s per linear [in]
    sparsity: dict[str, float] = field(default_factory=dict)  # actual fraction of zeros per linear
    row_sparsity: dict[str, Tensor] = field(default_factory=dict)  # per-row fraction of zeros [out]
    summary: Any = None  # an allocator's summary of the block's dense statistics (e.g. OWL's D)
    experts: dict[str, ExpertCalibration] = field(default_factory=dict)  # experts module path -> how calibrated


def _micro_batches(hidden: Tensor, max_tokens: int | None):
    n, seqlen = hidden.shape[0], hidden.shape[1]
    step = max(1, max_tokens_for(hidden.device, max_tokens) // max(seqlen, 1))
    for i in range(0, n, step):
        yield slice(i, min(i + step, n))


@torch.no_grad()
def forward_block(block: nn.Module, hidden: Tensor, kwargs: dict, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> Tensor:
    """block(hidden) for [n, seqlen, d] hidden states, in micro-batches."""
    out = torch.empty_like(hidden)
    for sl in _micro_batches(hidden, max_tokens):
        out[sl] = call_block(block, hidden[sl], kwargs)
    return out


@torch.no_grad()
def _collect(
    block: nn.Module,
    family: Family,
    hidden: Tensor,
    kwargs: dict,
    kinds: frozenset,
    max_tokens: int,
    want_output: bool,
    *,
    experts: S.ExpertRule = DEFAULT_EXPERT_RULE,
    all_tokens: dict[str, tuple[int, ...]] | None = None,
    calibration: dict[str, ExpertCalibration] | None = None,
) -> tuple[dict[str, S.LinearStats], Tensor | None]:
    """Run the block over all windows collecting input sums; skip the tail if no output is needed.

    Experts follow `experts` (routed tokens; a second pass over the block gives starved experts
    all tokens), unless `all_tokens` (experts module path -> experts) fixes which experts take
    every token: NeuroAL's sparse pass repeats its dense pass's choice. `calibration`, if given,
    is filled with an `ExpertCalibration` per experts module.
    """
    linears = block_linears(block, family)
    groups = _expert_groups(linears)
    if all_tokens is None:
        everyone = {path: tuple(range(n)) if experts.calibrate_all else () for path, (_, n) in groups.items()}
    else:
        everyone = {path: tuple(all_tokens.get(path, ())) for path in groups}
    routed = {}
    stats, out = _run_collect(block, family, linears, hidden, kwargs, kinds, max_tokens, want_output,
                              {groups[p][0]: frozenset(e) for p, e in everyone.items()}, routed)
    if not groups:
        return stats, out
    starved = {}
    if all_tokens is None and not experts.calibrate_all:
        starved = {p: tuple(e for e, n in enumerate(routed[key].tolist()) if n < experts.min_tokens)
                   for p, (key, _) in groups.items()}
        starved = {p: e for p, e in starved.items() if e}
    if starved:  # their statistics again, over every token
        redo = {n: u for n, u in linears.items() if isinstance(u, ExpertMatrix)
                and u.index in starved.get(u.spec.module, ())}
        logger.info("experts calibrated on all tokens (fewer than %d routed): %s", experts.min_tokens, starved)
        again, _ = _run_collect(block, family, redo, hidden, kwargs, kinds, max_tokens, False,
                                {groups[p][0]: frozenset(e) for p, e in starved.items()}, None)
        stats.update(again)
    if calibration is not None:
        for path, (key, _) in groups.items():
            chosen = tuple(sorted(set(everyone[path]) | set(starved.get(path, ()))))
            calibration[path] = ExpertCalibration(tuple(routed[key].tolist()), chosen, _rule_text(experts))
    return stats, out


def _rule_text(experts: S.ExpertRule) -> str:
    if experts.calibrate_all:
        return "every expert on all tokens"
    return f"routed tokens; all tokens for an expert routed fewer than {experts.min_tokens}"


def _expert_groups(linears: dict) -> dict[str, tuple[int, int]]:
    """Experts module path -> (id of the module, number of experts), for the units in `linears`."""
    return {u.spec.module: (id(u.experts), u.parameter.shape[0]) for u in linears.values() if isinstance(u, ExpertMatrix)}


def _run_collect(block, family, linears, hidden, kwargs, kinds, max_tokens, want_output, all_tokens, routed):
    stop_after = None if want_output else next(reversed(linears))
    out = torch.empty_like(hidden) if want_output else None
    with S.collect(linears, kinds, stop_after=stop_after, input_from=derived_inputs(block, linears, family),
                   all_tokens=all_tokens, routed=routed) as stats:
        for sl in _micro_batches(hidden, max_tokens):
            try:
                y = call_block(block, hidden[sl], kwargs)
            except S.StopForward:
                continue
            if out is not None:
                out[sl] = y
    return stats, out


def derived_inputs(block: nn.Module, linears: dict[str, nn.Module], family: Family) -> dict:
    """Resolve the family's `input_from` widths (config attribute names) on this block."""
    out = {}
    for name, (src, start, width) in family.input_from:
        if isinstance(width, str):
            width = getattr(block.get_submodule(src.rsplit(".", 1)[0]), width)
        out[name] = (src, start, int(width))
    return out


def _pruned_weights(
    linears: dict[str, nn.Module],
    stats: dict[str, S.LinearStats],
    ratios: Mapping[str, float | Tensor],
    opts: PruneOptions,
    family: Family,
) -> dict[str, Tensor]:
    """New (pruned) weights for every linear of the block at its ratio; the block is untouched."""
    method = opts.base
    new = {}
    for name, lin in linears.items():
        W = lin.weight.data
        if opts.refiner is not None:
            new[name] = opts.refiner.prune(W, stats[name], ratios[name], method, pattern=opts.pattern,
                                           is_mlp=name in family.mlp)
        else:
            new[name] = prune_linear(W, stats.get(name), ratios[name], method, pattern=opts.pattern,
                                     granularity=opts.granularity, blocksize=opts.blocksize, percdamp=opts.percdamp,
                                     linear=name)
    return new


def block_sparsity(block: nn.Module, family: Family) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Fraction of zeros per linear, and per output row, of a block as it is now."""
    return _sparsity(block_linears(block, family), rows=True)


def _sparsity(linears: dict[str, nn.Module], rows: bool) -> tuple[dict[str, float], dict[str, Tensor]]:
    dense, per_row = {}, {}
    for name, lin in linears.items():
        zeros = lin.weight.data == 0
        dense[name] = zeros.float().mean().item()
        if rows:
            per_row[name] = zeros.float().mean(dim=1)
    return dense, per_row


@torch.no_grad()
def dense_block(
    block: nn.Module,
    family: Family,
    hidden: Tensor,
    kwargs: dict,
    *,
    kinds: frozenset = frozenset(),
    summary: Callable[[dict[str, Tensor], dict[str, S.LinearStats]], Any] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    experts: S.ExpertRule = DEFAULT_EXPERT_RULE,
) -> tuple[Tensor, BlockResult]:
    """Dense output, and `summary(weights, stats)` of the block's dense statistics `kinds` if given.

    The summary runs where the block is (e.g. OWL's outlier ratio), so only its value travels.
    """
    result = BlockResult()
    st, out = _collect(block, family, hidden, kwargs, kinds, max_tokens, want_output=True, experts=experts,
                       calibration=result.experts)
    if summary is not None:
        result.summary = summary({n: lin.weight.data for n, lin in block_linears(block, family).items()}, st)
    return out, result


@torch.no_grad()
def prune_block(
    block: nn.Module,
    family: Family,
    hidden: Tensor | None,
    kwargs: dict,
    ratios: Mapping[str, float | Tensor],
    opts: PruneOptions,
    *,
    want_output: bool = True,
) -> tuple[Tensor | None, BlockResult]:
    """Prune the block in place (final pass) and return its sparse output on the same inputs.

    `hidden` may be None for data-free methods (magnitude without DSnoT) when no output is needed.
    """
    linears = block_linears(block, family)
    kinds = opts.needs
    st = {}
    result = BlockResult()
    if kinds:
        st, _ = _collect(block, family, hidden, kwargs, kinds, opts.max_tokens, want_output=False,
                         experts=opts.experts, calibration=result.experts)
    for name, W in _pruned_weights(linears, st, ratios, opts, family).items():
        linears[name].weight.data.copy_(W)  # into the block's own storage (an expert's: its slice)
    del st
    result.sparsity, result.row_sparsity = _sparsity(linears, rows=True)
    out = forward_block(block, hidden, kwargs, opts.max_tokens) if want_output and hidden is not None else None
    return out, result


def alignment_metric(a_dense: Tensor, a_sparse: Tensor) -> float:
    """NeuroAL's per-linear metric: ‖a^d/Σa^d − a^s/Σa^s‖₂ / len(a) (reference `get_neuroal_block`).

    An all-zero a (an expert the sparse model routes no token to) normalises to zeros, not NaN.
    """
    diff = _share(a_dense) - _share(a_sparse)
    return torch.norm(diff, p=2).item() / a_dense.numel()


def _share(a: Tensor) -> Tensor:
    total = a.sum()
    return a / total if total != 0 else torch.zeros_like(a)


def metric_kind(method: Method) -> str:
    """Which input norms the NeuroAL metric reads: the reference's search with SparseGPT takes them
    from its SparseGPT wrapper (`HESSIAN_NORMS`, see neuroal.stats), every other method from Wanda's."""
    return S.HESSIAN_NORMS if method.solver is not None else S.NORMS


def _metric_norms(st: S.LinearStats, kind: str) -> Tensor:
    return st.hessian_norms if kind == S.HESSIAN_NORMS else st.norms


@torch.no_grad()
def score_block(
    block: nn.Module,
    family: Family,
    hidden: Tensor,
    kwargs: dict,
    ratios: Mapping[str, float | Tensor],
    opts: PruneOptions,
    *,
    want_alignment: bool = False,
) -> tuple[Tensor, BlockResult]:
    """Score one NeuroAL candidate on one block and return the sparse output for the next block.

    Dense pass on the stream's current input (input norms a^d and the method's statistics),
    prune at the candidate's ratios, sparse pass on the same input (a^s and the output), then
    restore the dense weights: the block is left exactly as it was.
    """
    linears = block_linears(block, family)
    kind = metric_kind(opts.base)
    result = BlockResult()
    dense, _ = _collect(block, family, hidden, kwargs, opts.needs | {kind}, opts.max_tokens, want_output=False,
                        experts=opts.experts, calibration=result.experts)
    # the sparse pass runs on the pruned copies swapped in; the dense tensors are swapped back.
    # Fused expert parameters are swapped whole: a copy with every pruned slice written in.
    plain = {name: lin for name, lin in linears.items() if not isinstance(lin, ExpertMatrix)}
    fused = {id(u.parameter): u.parameter for u in linears.values() if isinstance(u, ExpertMatrix)}
    dense_weights = {name: lin.weight.data for name, lin in plain.items()}
    dense_fused = {key: p.data for key, p in fused.items()}
    try:
        pruned = _pruned_weights(linears, dense, ratios, opts, family)
        for p in fused.values():
            p.data = p.data.clone()
        for name, W in pruned.items():
            if name in plain:
                linears[name].weight.data = W
            else:
                linears[name].weight.copy_(W)
        del pruned
        sparse, out = _collect(block, family, hidden, kwargs, frozenset({kind}), opts.max_tokens, want_output=True,
                               all_tokens={p: c.all_tokens for p, c in result.experts.items()})
    finally:
        for name, lin in plain.items():
            lin.weight.data = dense_weights[name]
        for key, p in fused.items():
            p.data = dense_fused[key]
    for name in linears:
        a_d, a_s = _metric_norms(dense[name], kind), _metric_norms(sparse[name], kind)
        result.metric[name] = alignment_metric(a_d, a_s)
        if want_alignment:
            result.alignment[name] = a_d - a_s
    return out, result
