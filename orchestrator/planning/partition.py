"""Shard planner: split a model's decoder blocks into contiguous shards, one per accelerator.

Each Ray actor holds a contiguous run of decoder blocks (plus the embeddings on the first shard and
the final norm / lm head on the last) and the activation memory of the streams it has in flight.
The planner reads only a config (`measure_model`), so any supported family plans the same way.

>>> from transformers import LlamaConfig
>>> cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
...                   num_attention_heads=4, num_key_value_heads=2)
>>> plan = plan_shards(cfg, n_actors=2, mem_per_actor=parse_bytes("1GB"), seqlen=16)
>>> [(s.first_block, s.last_block) for s in plan.shards], plan.shards[-1].has_head
([(0, 1), (2, 3)], True)
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from neuroal.errors import SpecError
from orchestrator.planning.layout import ModelLayout, measure_model
from orchestrator.planning.memory import ActivationEstimate, estimate_activation, logits_bytes
from orchestrator.planning.shards import Plan, ShardPlan, ShardSpec
from orchestrator.planning.sizes import DTYPE_BYTES, canonical_dtype, format_bytes, parse_bytes

logger = logging.getLogger(__name__)


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(name, value, f"an integer >= {minimum}")
    return value


def default_micro_tokens() -> int:
    """Tokens per block call on an accelerator (plans are for GPU actors)."""
    from neuroal.block import MAX_TOKENS

    return MAX_TOKENS["cuda"]


def needs_hessian(method: str) -> bool:
    """The method keeps a Hessian per linear (SparseGPT, APT, D²Prune): the plan adds their bytes."""
    from neuroal.methods import METHODS
    from neuroal.stats import HESSIAN

    return HESSIAN in METHODS.get(method).needs  # an unknown name: METHODS' one line naming --method


class _Shards:
    """Bytes of every candidate shard [i, j) of blocks (with the embeddings/head it must carry).

    Tables are O(L²) for L blocks (6,400 entries for a 70B model), so the partition searches below
    are plain lookups.
    """

    def __init__(self, layout: ModelLayout, e: int, acts: list[ActivationEstimate], logits: int,
                 head_runs: bool = False):
        n = self.n = layout.n_blocks
        self.pre = layout.pre_params * e
        self.post = layout.post_params * e
        self.head_runs = head_runs
        self.tied = layout.tied_params * e
        self.prefix = [0]
        for b in layout.blocks:
            self.prefix.append(self.prefix[-1] + b.params * e)
        self.acts = acts
        self.logits = logits
        # largest[i][j]: the block of [i, j) with the largest activation estimate
        self.largest = [[0] * (n + 1) for _ in range(n + 1)]
        self.total = [[0] * (n + 1) for _ in range(n + 1)]
        for i in range(n):
            arg = i
            for j in range(i + 1, n + 1):
                if acts[j - 1].total > acts[arg].total:
                    arg = j - 1
                self.largest[i][j] = arg
                self.total[i][j] = self.params(i, j) + self.activation(i, j).total

    def blocks(self, i: int, j: int) -> int:
        return self.prefix[j] - self.prefix[i]

    def pace(self, i: int, j: int) -> int:
        """Bytes a stream's compute through shard [i, j) is proportional to (FLOPs ≈ 2·params·tokens).

        The decoder blocks, plus the final norm and head on the last shard when the passes run the
        head on every token (evaluation: for SmolLM2 the tied 49k-word head weighs as much as 8 of
        its 30 blocks). The search and the final pass stop at the last block.
        """
        total = self.blocks(i, j)
        if self.head_runs and j == self.n:
            total += self.post
        return total

    def params(self, i: int, j: int) -> int:
        total = self.blocks(i, j)
        if i == 0:
            total += self.pre
        if j == self.n:
            total += self.post - (self.tied if i == 0 else 0)  # one shard holds one tied matrix
        return total

    def activation(self, i: int, j: int) -> ActivationEstimate:
        act = self.acts[self.largest[i][j]]
        if j == self.n:
            act = replace(act, logits=self.logits)
        return act


def _fewest(sh: _Shards, budget: int) -> int | None:
    """Fewest contiguous shards whose totals all fit `budget` (None: even one block per shard fails)."""
    n, inf = sh.n, math.inf
    count = [0] + [inf] * n
    for j in range(1, n + 1):
        for i in range(j):
            if count[i] + 1 < count[j] and sh.total[i][j] <= budget:
                count[j] = count[i] + 1
    return None if count[n] == inf else int(count[n])


def _partition(sh: _Shards, k: int, value, *, additive: bool = False, allowed=None):
    """Best split of the blocks into exactly k contiguous shards (exact DP, O(k·L²)).

    Minimises the largest ``value(i, j)`` over shards (or their sum when `additive`), over shards
    for which ``allowed(i, j)`` holds. Returns (objective, spans) or (inf, None) when no split is
    allowed.
    """
    n, inf = sh.n, math.inf
    best = [0] + [inf] * n
    cuts: list[list[int]] = []
    for kk in range(1, k + 1):
        row, cut = [inf] * (n + 1), [-1] * (n + 1)
        for j in range(kk, n - (k - kk) + 1):  # leave at least one block per later shard
            for i in range(kk - 1, j):
                if best[i] == inf or (allowed is not None and not allowed(i, j)):
                    continue
                v = value(i, j)
                cand = best[i] + v if additive else max(best[i], v)
                if cand < row[j]:
                    row[j], cut[j] = cand, i
        best = row
        cuts.append(cut)
    if best[n] == inf:
        return inf, None
    spans, j = [], n
    for kk in range(k, 0, -1):
        i = cuts[kk - 1][j]
        spans.append((i, j))
        j = i
    return best[n], spans[::-1]


def _balanced(sh: _Shards, k: int, budget: int):
    """Split into k shards that fit `budget`, balanced; None if none fits.

    Three exact passes: (1) minimise the largest shard's pace (`_Shards.pace`: its block bytes,
    plus the head's when the passes run it), which sets the pipeline's pace; (2) at that, minimise
    the largest total (weights + embeddings/head + activations), so the first and last shards give
    up blocks for what they carry; (3) at both, the most even paces (least sum of squares).
    """
    fits = lambda i, j: sh.total[i][j] <= budget  # noqa: E731
    c1, spans = _partition(sh, k, sh.pace, allowed=fits)
    if spans is None:
        return None
    c2, _ = _partition(sh, k, lambda i, j: sh.total[i][j], allowed=lambda i, j: fits(i, j) and sh.pace(i, j) <= c1)
    _, spans = _partition(
        sh,
        k,
        lambda i, j: sh.pace(i, j) ** 2,
        additive=True,
        allowed=lambda i, j: sh.total[i][j] <= c2 and sh.pace(i, j) <= c1,
    )
    return spans


def plan_shards(
    config,
    *,
    n_actors: int | None = None,
    mem_per_actor: int,
    dtype: str = "bfloat16",
    streams_in_flight: int = 2,
    stream_windows: int = 8,
    seqlen: int = 2048,
    method: str = "wanda",
    headroom: float = 0.1,
    nsamples: int = 128,
    head_runs: bool = False,
) -> Plan:
    """Split the decoder blocks into contiguous shards under a per-actor memory budget.

    Every shard must satisfy ``param_bytes + activation_bytes <= mem_per_actor · (1 − headroom)``
    (see `estimate_activation` for the activation formula and its margin). Embeddings go with the
    first shard, the final norm and head with the last (a tied head duplicates the embedding matrix
    there, unless a single shard holds both). Among the splits that fit, the plan minimises the
    largest shard's decoder-block bytes (the pipeline's pace; with `head_runs`, the last shard's
    head counts too), then the largest shard's total bytes, then evens out the rest (`_balanced`);
    all three are exact linear-partition DPs.

    Args:
        config: a transformers config (never weights).
        n_actors: exactly this many shards; None: the fewest actors that fit.
        mem_per_actor: accelerator memory per actor, bytes (see `parse_bytes`).
        dtype: compute dtype of weights and activations: bfloat16, float16 or float32.
        streams_in_flight: streams resident on each actor at once (pipeline depth).
        stream_windows: calibration windows per stream (8 for the NeuroAL search).
        nsamples: calibration windows of the final pass, one stream of them all (128).
        seqlen: tokens per window.
        method: base pruning method; the solvers (SparseGPT/APT/D²Prune) add the per-linear Hessians.
        headroom: fraction of `mem_per_actor` left unplanned, in [0, 1).
        head_runs: the passes run the lm head on every token (a session that only evaluates), so
            the last shard's pace includes the head and it takes fewer blocks. A pruning session
            (search and final pass stop at the last block) balances the blocks alone.

    Returns:
        The plan.

    Raises:
        SpecError: a bad argument, or the model does not fit: naming ``--gpu-mem`` with the
            minimum memory per actor (or ``--gpus`` for an impossible actor count).
        UnsupportedArchitecture: no family adapter for the config.
    """
    dtype = canonical_dtype(dtype)
    e = DTYPE_BYTES[dtype]
    mem_per_actor = parse_bytes(mem_per_actor)
    _positive("--streams", streams_in_flight)
    _positive("--stream-windows", stream_windows)
    _positive("--nsamples", nsamples)
    _positive("--seqlen", seqlen)
    if isinstance(headroom, bool) or not (isinstance(headroom, (int, float)) and 0.0 <= headroom < 1.0):
        raise SpecError("--headroom", headroom, "a fraction in [0, 1)")
    hessian = needs_hessian(method)
    layout = measure_model(config)
    n = layout.n_blocks
    if n_actors is not None:
        _positive("--gpus", n_actors)
        if n_actors > n:
            raise SpecError("--gpus", n_actors, f"1..{n} (at most one actor per decoder block)")

    micro_tokens = default_micro_tokens()
    acts = [
        estimate_activation(
            b,
            hidden_size=layout.hidden_size,
            dtype_bytes=e,
            streams_in_flight=streams_in_flight,
            stream_windows=stream_windows,
            seqlen=seqlen,
            hessian=hessian,
            final_windows=nsamples,
            micro_tokens=micro_tokens,
        )
        for b in layout.blocks
    ]
    sh = _Shards(layout, e, acts, logits_bytes(seqlen, layout.vocab_size, e), head_runs=head_runs)
    budget = int(mem_per_actor * (1.0 - headroom))

    def need(total: float) -> str:
        return format_bytes(total / (1.0 - headroom), round_up=True)

    # splitting a shard never makes a part bigger, so one block per actor is the least any needs
    floor = max(sh.total[i][i + 1] for i in range(n))
    if floor > budget:
        raise SpecError(
            "--gpu-mem",
            format_bytes(mem_per_actor),
            f">= {need(floor)} per actor: one decoder block with embeddings/head and activations "
            f"needs {format_bytes(floor)} plus {headroom:.0%} headroom "
            f"(or lower --seqlen / streams in flight)",
        )
    fewest = _fewest(sh, budget)
    assert fewest is not None  # the floor fits
    k = fewest if n_actors is None else n_actors
    spans = _balanced(sh, k, budget)
    if spans is None:
        smallest, _ = _partition(sh, k, lambda i, j: sh.total[i][j])
        raise SpecError(
            "--gpu-mem",
            format_bytes(mem_per_actor),
            f">= {need(smallest)} per actor for {k} actors "
            f"(or use --gpus >= {fewest} at {format_bytes(mem_per_actor)})",
        )

    shards = tuple(
        ShardPlan(
            spec=ShardSpec(index, len(spans), i, j, has_embeddings=i == 0, has_head=j == n),
            block_param_bytes=sh.blocks(i, j),
            param_bytes=sh.params(i, j),
            activation=sh.activation(i, j),
        )
        for index, (i, j) in enumerate(spans)
    )
    plan = Plan(
        shards=shards,
        model_type=layout.model_type,
        family=layout.family,
        n_blocks=n,
        total_params=layout.total_params,
        dtype=dtype,
        tied_embeddings=layout.tied_params > 0,
        mem_per_actor=mem_per_actor,
        headroom=float(headroom),
        streams_in_flight=streams_in_flight,
        stream_windows=stream_windows,
        seqlen=seqlen,
        method=method,
        block_param_bytes=tuple(b.params * e for b in layout.blocks),
        nsamples=nsamples,
        head_runs=head_runs,
    )
    logger.info(
        "plan: %s, %d blocks in %d shards, largest %s of %s budget",
        layout.model_type,
        n,
        plan.n_actors,
        format_bytes(plan.max_total_bytes),
        format_bytes(budget),
    )
    return plan
