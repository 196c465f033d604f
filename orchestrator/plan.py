"""Shard planner: split a model's decoder blocks into contiguous shards, one per accelerator.

Each Ray actor holds a contiguous run of decoder blocks (plus the embeddings on the first shard and
the final norm / lm head on the last) and the activation memory of the streams it has in flight.
The planner reads only a config: parameter counts come from a meta-device skeleton
(`neuroal.models.build_skeleton`, no memory), so any supported family plans the same way.

>>> from transformers import LlamaConfig
>>> cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
...                   num_attention_heads=4, num_key_value_heads=2)
>>> plan = plan_shards(cfg, n_actors=2, mem_per_actor=parse_bytes("1GB"), seqlen=16)
>>> [(s.first_block, s.last_block) for s in plan.shards], plan.shards[-1].has_head
([(0, 1), (2, 3)], True)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from neuroal.errors import ModelLoadError, SpecError
from neuroal.families import Family, family_for, get_blocks, linear_shapes

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

STATS_BYTES = 4  # fp32 statistics (neuroal.stats.STATS_DTYPE)
# sort-based masks on the widest linear: fp32 score + fp32 sorted values + int64 indices + bool mask
MASK_BYTES_PER_WEIGHT = 4 + 4 + 8 + 1
# OBS solver workspace on the widest linear: damped H copy, its Cholesky factor, H⁻¹, H⁻¹'s factor
SOLVER_HESSIAN_COPIES = 4
# logits of one window: compute dtype + fp32 upcast + fp32 log-softmax
LOGITS_EXTRA_BYTES = 4 + 4


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int, *, field: str = "--gpu-mem") -> int:
    """Parse a memory size: ``80GB``, ``80GiB``, ``24G``, ``512MB``, ``1.5TB`` or a byte count.

    Decimal units (K, M, G, T, with or without ``B``) are powers of 10 and binary units (Ki, Mi,
    Gi, Ti) powers of 2, as accelerate's ``max_memory``. An "80GB" A100 has 80 GiB, so reading
    ``80GB`` as 80·10⁹ bytes errs on the safe side by 7%.

    >>> parse_bytes("80GB"), parse_bytes("80GiB"), parse_bytes("512MB"), parse_bytes(1024)
    (80000000000, 85899345920, 512000000, 1024)

    Args:
        text: the size as typed, or an int (bytes).
        field: the CLI field named in the error.

    Returns:
        The size in bytes (> 0).

    Raises:
        SpecError: empty, negative, zero or unknown unit.
    """
    allowed = "a positive size such as 80GB, 80GiB, 24G, 512MB or a byte count"
    if isinstance(text, bool):
        raise SpecError(field, text, allowed)
    if isinstance(text, int):
        if text <= 0:
            raise SpecError(field, text, allowed)
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise SpecError(field, text, allowed)
    number, unit = match.groups()
    value = int(float(number) * _UNITS[(unit or "").lower()])
    if value <= 0:
        raise SpecError(field, text, allowed)
    return value


def format_bytes(n: float, *, round_up: bool = False) -> str:
    """Human size in decimal units (``17.1 GB``), the unit `parse_bytes` reads back.

    >>> format_bytes(17_110_000_000), format_bytes(17_110_000_000, round_up=True), format_bytes(12)
    ('17.1 GB', '17.2 GB', '12 B')

    Args:
        n: bytes.
        round_up: round up to the shown precision (for stated minimums, so the shown value works).
    """
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= scale:
            value = math.ceil(n * 10 / scale) / 10 if round_up else n / scale
            return f"{value:.1f} {unit}"
    return f"{math.ceil(n) if round_up else int(n)} B"


# ---------------------------------------------------------------------------------------------
# the model, measured on the meta device
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """Parameter count and prunable-linear shapes of one decoder block."""

    params: int
    linears: tuple[tuple[str, int, int], ...]  # (name, out_features, in_features)

    @property
    def max_in(self) -> int:
        return max(i for _, _, i in self.linears)

    @property
    def sum_out(self) -> int:
        return sum(o for _, o, _ in self.linears)

    @property
    def sum_in(self) -> int:
        return sum(i for _, _, i in self.linears)

    @property
    def sum_in_sq(self) -> int:
        return sum(i * i for _, _, i in self.linears)

    @property
    def max_weight(self) -> int:
        return max(o * i for _, o, i in self.linears)

    @property
    def widest(self) -> tuple[int, int]:
        """(out, in) of the linear with the widest input (the solver's largest Hessian)."""
        _, o, i = max(self.linears, key=lambda t: (t[2], t[1]))
        return o, i


@dataclass(frozen=True)
class ModelLayout:
    """Parameter counts of a model by part, from a meta-device skeleton (no weights read).

    Attributes:
        model_type: ``config.model_type``.
        family: the family adapter's name.
        blocks: one entry per decoder block, in order.
        pre_params: everything before the blocks (embeddings, positional embeddings, projections).
        post_params: final norm, projections and the lm head (including a tied head's weight).
        tied_params: parameters of the lm head tied to the input embeddings (0 if untied); held by
            the first shard as embeddings and duplicated on the last shard as the head.
        hidden_size: width of the residual stream entering each block.
        vocab_size: width of the logits.
    """

    model_type: str
    family: str
    blocks: tuple[BlockLayout, ...]
    pre_params: int
    post_params: int
    tied_params: int
    hidden_size: int
    vocab_size: int

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def total_params(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return self.pre_params + sum(b.params for b in self.blocks) + self.post_params - self.tied_params


def _config_key(config) -> str | None:
    try:
        return config.to_json_string(use_diff=False)
    except (TypeError, ValueError):  # an unserialisable custom field: measure without caching
        return None


def measure_model(config) -> ModelLayout:
    """Count parameters per decoder block and for the parts before/after them.

    Builds the model on the meta device (accelerate ``init_empty_weights``) and classifies every
    parameter by name: under the family's block list → that block; under one of the family's head
    paths → post; anything else → pre. Buffers (rotary tables) are not counted.

    Raises:
        UnsupportedArchitecture: no family adapter for ``config.model_type``.
    """
    family = family_for(config)  # fail fast, before building anything
    return _measure(_config_key(config), config, family)


_LAYOUTS: dict[str, ModelLayout] = {}  # config JSON -> layout (a 70B skeleton takes ~1.5 s)


def _measure(key: str | None, config, family: Family) -> ModelLayout:
    if key is not None and key in _LAYOUTS:
        return _LAYOUTS[key]
    from neuroal.models import build_skeleton

    model = build_skeleton(copy.deepcopy(config))  # from_config sets attention fields on its config
    blocks = get_blocks(model, family)
    n_blocks = len(blocks)
    block_params = [0] * n_blocks
    pre = post = 0
    prefix = family.blocks + "."
    heads = tuple(path + "." for path in family.head)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix):
            block_params[int(name[len(prefix) :].split(".", 1)[0])] += p.numel()
        elif name.startswith(heads):
            post += p.numel()
        else:
            pre += p.numel()
    layouts = tuple(
        BlockLayout(
            params=block_params[i],
            linears=tuple((n, o, i_) for n, (o, i_) in linear_shapes(blocks[i], family).items()),
        )
        for i in range(n_blocks)
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = 0
    if out_emb is not None and in_emb is not None and getattr(text, "tie_word_embeddings", False):
        tied = out_emb.weight.numel()
    hidden = getattr(text, "hidden_size", None) or layouts[0].linears[0][2]
    vocab = out_emb.weight.shape[0] if out_emb is not None else getattr(text, "vocab_size", 0)
    layout = ModelLayout(
        model_type=config.model_type,
        family=family.name,
        blocks=layouts,
        pre_params=pre,
        post_params=post,
        tied_params=tied,
        hidden_size=int(hidden),
        vocab_size=int(vocab),
    )
    if key is not None:
        if len(_LAYOUTS) >= 16:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = layout
    del model
    return layout


# ---------------------------------------------------------------------------------------------
# activation memory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationEstimate:
    """Accelerator memory one actor needs besides its weights, in bytes, term by term.

    See `estimate_activation` for the formula of each term.
    """

    streams: int
    working_set: int
    stats_upcast: int
    linear_stats: int
    hessians: int
    candidate_copy: int
    mask_workspace: int
    logits: int = 0

    @property
    def total(self) -> int:
        return (
            self.streams
            + self.working_set
            + self.stats_upcast
            + self.linear_stats
            + self.hessians
            + self.candidate_copy
            + self.mask_workspace
            + self.logits
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _default_micro_tokens() -> int:
    """Tokens per block call on an accelerator (plans are for GPU actors)."""
    from neuroal.block import MAX_TOKENS

    return MAX_TOKENS["cuda"]


def _needs_hessian(method: str) -> bool:
    from neuroal.methods import METHODS
    from neuroal.stats import HESSIAN

    try:
        return HESSIAN in METHODS.get(method).needs
    except SpecError as exc:
        raise SpecError("--method", method, METHODS.names()) from exc


def estimate_activation(
    block: BlockLayout,
    *,
    hidden_size: int,
    dtype_bytes: int,
    streams_in_flight: int,
    stream_windows: int,
    seqlen: int,
    hessian: bool,
    micro_tokens: int,
    vocab_size: int = 0,
    with_head: bool = False,
) -> ActivationEstimate:
    """Estimate the activation memory of one actor whose largest block is `block`.

    Notation: e = bytes per element of the compute dtype, K = streams in flight, W = windows per
    stream, S = seqlen, d = hidden size, T = min(W·S, micro_tokens) tokens per block call, and for
    the block's prunable linears (out_i, in_i); P = the block's parameter count, V = vocab size::

        streams        = (K + 1) · W·S·d · e         K resident stream inputs + the output buffer
                                                     of the stream being computed
        working_set    = T · (Σ out_i + max in_i + 2d) · e
                                                     one block forward on a micro-batch: every
                                                     linear's output, the widest linear input
                                                     (act(gate)·up), residual + norm output. For
                                                     LLaMA this is T·(3I + 5d + 2·d_kv), close to
                                                     the usual T·(3I + 4d) rule.
        stats_upcast   = 2 · T · max in_i · 4        the statistics hook's fp32 copy of a linear's
                                                     input and its square (neuroal.stats)
        linear_stats   = 4 · Σ in_i · 4              fp32 running sums per linear: Σx² dense and
                                                     sparse (NeuroAL), Σx and Σvar (DSnoT)
        hessians       = (Σ in_i² + 4·in_w² + out_w·in_w) · 4   SparseGPT/APT only
                                                     one fp32 XᵀX per linear of the block, plus
                                                     the OBS workspace of the widest linear w
                                                     (damped copy, Cholesky factor, H⁻¹ and its
                                                     factor; fp32 copy of W)
        candidate_copy = P · e                       working copy of the block's weights while a
                                                     λ candidate is scored (restored afterwards)
        mask_workspace = max(out_i·in_i) · 17        fp32 score, fp32 sorted values, int64 sort
                                                     indices and the bool mask of the largest linear
        logits         = S · V · (e + 8)             last shard only: logits of one window plus the
                                                     fp32 upcast and log-softmax (perplexity)

    Only one stream is computed at a time per actor (Ray actors run one method call at a time),
    so the working set, statistics and workspaces are counted once; the other K−1 streams only
    hold their hidden states. Calibration windows beyond the streams in flight (the 128-window
    final pass) wait in the Ray object store, in host memory, not on the accelerator. Attention
    is assumed fused (SDPA flash / memory-efficient kernels on GPU): no [S, S] score matrix.

    It is an estimate: the caller leaves a `headroom` fraction of each accelerator unplanned
    (default 10%) for the CUDA context (~0.5–1 GB), caching-allocator fragmentation, NCCL buffers
    and the estimate's own error, which should stay within ±15% of the measured peak.

    Returns:
        The estimate, term by term.
    """
    e = dtype_bytes
    tokens = min(stream_windows * seqlen, micro_tokens)
    hessians = 0
    if hessian:
        out_w, in_w = block.widest
        hessians = (block.sum_in_sq + SOLVER_HESSIAN_COPIES * in_w * in_w + out_w * in_w) * STATS_BYTES
    return ActivationEstimate(
        streams=(streams_in_flight + 1) * stream_windows * seqlen * hidden_size * e,
        working_set=tokens * (block.sum_out + block.max_in + 2 * hidden_size) * e,
        stats_upcast=2 * tokens * block.max_in * STATS_BYTES,
        linear_stats=4 * block.sum_in * STATS_BYTES,
        hessians=hessians,
        candidate_copy=block.params * e,
        mask_workspace=block.max_weight * MASK_BYTES_PER_WEIGHT,
        logits=seqlen * vocab_size * (e + LOGITS_EXTRA_BYTES) if with_head else 0,
    )


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """One actor's share of the model.

    Attributes:
        index: position in the chain (0 = first).
        first_block, last_block: the decoder blocks it holds, inclusive.
        has_embeddings: holds everything before the blocks (first shard).
        has_head: holds the final norm and lm head (last shard); with tied embeddings a copy of
            the input embedding matrix serves as the head.
        block_param_bytes: bytes of its decoder blocks' parameters.
        param_bytes: ``block_param_bytes`` plus the embeddings / head it holds.
        activation: the activation memory estimate (`estimate_activation`).
    """

    index: int
    first_block: int
    last_block: int
    has_embeddings: bool
    has_head: bool
    block_param_bytes: int
    param_bytes: int
    activation: ActivationEstimate

    @property
    def end_block(self) -> int:
        """One past the last block (Python slice end)."""
        return self.last_block + 1

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.end_block)

    @property
    def n_blocks(self) -> int:
        return self.last_block - self.first_block + 1

    @property
    def activation_bytes(self) -> int:
        return self.activation.total

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "first_block": self.first_block,
            "last_block": self.last_block,
            "end_block": self.end_block,
            "n_blocks": self.n_blocks,
            "has_embeddings": self.has_embeddings,
            "has_head": self.has_head,
            "block_param_bytes": self.block_param_bytes,
            "param_bytes": self.param_bytes,
            "activation_bytes": self.activation_bytes,
            "total_bytes": self.total_bytes,
            "activation": self.activation.to_dict(),
        }


@dataclass(frozen=True)
class Plan:
    """Shards of one model under a per-actor memory budget.

    Attributes:
        shards: contiguous, in order, covering every block once.
        model_type, family, n_blocks, total_params: the model (total counts a tied head once).
        dtype: compute dtype of weights and hidden states.
        tied_embeddings: the head reuses the input embedding matrix.
        mem_per_actor: accelerator memory per actor, bytes.
        headroom: fraction of ``mem_per_actor`` left unplanned.
        streams_in_flight, stream_windows, seqlen, method: what the activation estimate assumes.
        block_param_bytes: bytes of each decoder block, in order.
    """

    shards: tuple[ShardPlan, ...]
    model_type: str
    family: str
    n_blocks: int
    total_params: int
    dtype: str
    tied_embeddings: bool
    mem_per_actor: int
    headroom: float
    streams_in_flight: int
    stream_windows: int
    seqlen: int
    method: str
    block_param_bytes: tuple[int, ...] = field(repr=False, default=())

    @property
    def n_actors(self) -> int:
        return len(self.shards)

    @property
    def budget_bytes(self) -> int:
        """What each actor may plan for: ``mem_per_actor · (1 − headroom)``."""
        return int(self.mem_per_actor * (1.0 - self.headroom))

    @property
    def max_total_bytes(self) -> int:
        return max(s.total_bytes for s in self.shards)

    def shard_of_block(self, block: int) -> ShardPlan:
        for shard in self.shards:
            if block in shard.blocks:
                return shard
        raise IndexError(f"block {block} is outside 0..{self.n_blocks - 1}")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (``json.dumps(plan.to_dict())``)."""
        return {
            "model_type": self.model_type,
            "family": self.family,
            "n_blocks": self.n_blocks,
            "total_params": self.total_params,
            "dtype": self.dtype,
            "tied_embeddings": self.tied_embeddings,
            "n_actors": self.n_actors,
            "mem_per_actor": self.mem_per_actor,
            "headroom": self.headroom,
            "budget_bytes": self.budget_bytes,
            "streams_in_flight": self.streams_in_flight,
            "stream_windows": self.stream_windows,
            "seqlen": self.seqlen,
            "method": self.method,
            "block_param_bytes": list(self.block_param_bytes),
            "shards": [s.to_dict() for s in self.shards],
        }


def _canonical_dtype(dtype: str) -> str:
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise SpecError("--dtype", dtype, sorted(DTYPE_BYTES))
    return key


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(name, value, f"an integer >= {minimum}")
    return value


class _Shards:
    """Bytes of every candidate shard [i, j) of blocks (with the embeddings/head it must carry).

    Tables are O(L²) for L blocks (6,400 entries for a 70B model), so the partition searches below
    are plain lookups.
    """

    def __init__(self, layout: ModelLayout, e: int, acts: list[ActivationEstimate], logits: int):
        n = self.n = layout.n_blocks
        self.pre = layout.pre_params * e
        self.post = layout.post_params * e
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

    Three exact passes: (1) minimise the largest shard's block bytes, which sets the pipeline's
    pace (compute per stream is proportional to them); (2) at that, minimise the largest total
    (weights + embeddings/head + activations), so the first and last shards give up blocks for
    what they carry; (3) at both, the most even block bytes (least sum of squares).
    """
    fits = lambda i, j: sh.total[i][j] <= budget  # noqa: E731
    c1, spans = _partition(sh, k, sh.blocks, allowed=fits)
    if spans is None:
        return None
    c2, _ = _partition(sh, k, lambda i, j: sh.total[i][j], allowed=lambda i, j: fits(i, j) and sh.blocks(i, j) <= c1)
    _, spans = _partition(
        sh,
        k,
        lambda i, j: sh.blocks(i, j) ** 2,
        additive=True,
        allowed=lambda i, j: sh.total[i][j] <= c2 and sh.blocks(i, j) <= c1,
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
) -> Plan:
    """Split the decoder blocks into contiguous shards under a per-actor memory budget.

    Every shard must satisfy ``param_bytes + activation_bytes <= mem_per_actor · (1 − headroom)``
    (see `estimate_activation` for the activation formula and its margin). Embeddings go with the
    first shard, the final norm and head with the last (a tied head duplicates the embedding matrix
    there, unless a single shard holds both). Among the splits that fit, the plan minimises the
    largest shard's decoder-block bytes (the pipeline's pace), then the largest shard's total
    bytes, then evens out the rest (`_balanced`); all three are exact linear-partition DPs.

    Args:
        config: a transformers config (never weights).
        n_actors: exactly this many shards; None: the fewest actors that fit.
        mem_per_actor: accelerator memory per actor, bytes (see `parse_bytes`).
        dtype: compute dtype of weights and activations: bfloat16, float16 or float32.
        streams_in_flight: streams resident on each actor at once (pipeline depth).
        stream_windows: calibration windows per stream (8 for the NeuroAL search).
        seqlen: tokens per window.
        method: base pruning method; SparseGPT/APT add the per-linear Hessians.
        headroom: fraction of `mem_per_actor` left unplanned, in [0, 1).

    Returns:
        The plan.

    Raises:
        SpecError: a bad argument, or the model does not fit: naming ``--gpu-mem`` with the
            minimum memory per actor (or ``--gpus`` for an impossible actor count).
        UnsupportedArchitecture: no family adapter for the config.
    """
    dtype = _canonical_dtype(dtype)
    e = DTYPE_BYTES[dtype]
    mem_per_actor = parse_bytes(mem_per_actor)
    _positive("--streams", streams_in_flight)
    _positive("--stream-windows", stream_windows)
    _positive("--seqlen", seqlen)
    if isinstance(headroom, bool) or not (isinstance(headroom, (int, float)) and 0.0 <= headroom < 1.0):
        raise SpecError("--headroom", headroom, "a fraction in [0, 1)")
    hessian = _needs_hessian(method)
    layout = measure_model(config)
    n = layout.n_blocks
    if n_actors is not None:
        _positive("--gpus", n_actors)
        if n_actors > n:
            raise SpecError("--gpus", n_actors, f"1..{n} (at most one actor per decoder block)")

    micro_tokens = _default_micro_tokens()
    acts = [
        estimate_activation(
            b,
            hidden_size=layout.hidden_size,
            dtype_bytes=e,
            streams_in_flight=streams_in_flight,
            stream_windows=stream_windows,
            seqlen=seqlen,
            hessian=hessian,
            micro_tokens=micro_tokens,
        )
        for b in layout.blocks
    ]
    sh = _Shards(layout, e, acts, seqlen * layout.vocab_size * (e + LOGITS_EXTRA_BYTES))
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
            index=index,
            first_block=i,
            last_block=j - 1,
            has_embeddings=i == 0,
            has_head=j == n,
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


# ---------------------------------------------------------------------------------------------
# config loading and rendering (for `neuroal plan`)
# ---------------------------------------------------------------------------------------------


def load_plan_config(model_or_config_path: str):
    """Read a transformers config for planning, never weights.

    Accepts a path to a ``config.json`` file, a local folder holding one, the embedded default
    ``smollm2-135m`` (through `neuroal.models.resolve_model`), or a Hugging Face hub id (needs the
    network or a populated hub cache).

    Raises:
        ModelLoadError: in one line, when the config cannot be read.
    """
    from transformers import AutoConfig

    from neuroal.models import DEFAULT_MODEL, load_config, resolve_model

    name = str(model_or_config_path)
    if name == DEFAULT_MODEL:
        return load_config(resolve_model(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model: {name!r} has no config.json")
        return load_config(path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ModelLoadError(f"model: config file {name!r} does not exist")
        try:
            data = json.loads(path.read_text())
            model_type = data.pop("model_type")
            return AutoConfig.for_model(model_type, **data)
        except KeyError:
            raise ModelLoadError(f"model: {name!r} has no 'model_type'") from None
        except Exception as exc:
            raise ModelLoadError(f"model: unreadable config {name!r} ({type(exc).__name__}: {exc})") from exc
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as exc:  # offline, gated, missing: one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(
            f"model: cannot read the config of {name!r} (not a local file or folder; hub: "
            f"{type(exc).__name__}: {first})"
        ) from exc


def plan_lines(plan: Plan) -> list[str]:
    """The plan as plain text lines (a header, one line per shard, the budget)."""
    lines = [_title(plan)]
    for row in _rows(plan):
        lines.append("  ".join(f"{cell:>{w}}" for cell, w in zip(row, (5, 9, 3, 3, 4, 9, 11, 9, 5))))
    lines.append(_caption(plan))
    return lines


def _title(plan: Plan) -> str:
    return (
        f"{plan.model_type}: {plan.n_blocks} blocks, {plan.total_params / 1e9:.2f}B params, {plan.dtype}"
        f"{' (tied head)' if plan.tied_embeddings else ''} -> {plan.n_actors} actor(s) x "
        f"{format_bytes(plan.mem_per_actor)}"
    )


def _caption(plan: Plan) -> str:
    return (
        f"budget {format_bytes(plan.budget_bytes)} per actor ({plan.headroom:.0%} headroom); activations: "
        f"{plan.streams_in_flight} streams x {plan.stream_windows} windows x {plan.seqlen} tokens, "
        f"method {plan.method}"
    )


def _rows(plan: Plan) -> list[tuple[str, ...]]:
    rows = [("shard", "blocks", "n", "emb", "head", "params", "activations", "total", "use")]
    for s in plan.shards:
        rows.append(
            (
                str(s.index),
                f"{s.first_block}-{s.last_block}",
                str(s.n_blocks),
                "yes" if s.has_embeddings else "",
                "yes" if s.has_head else "",
                format_bytes(s.param_bytes),
                format_bytes(s.activation_bytes),
                format_bytes(s.total_bytes),
                f"{s.total_bytes / plan.mem_per_actor:.0%}",
            )
        )
    return rows


def render_plan(plan: Plan):
    """A `rich.table.Table` of the plan, one row per actor (for ``neuroal plan``)."""
    from rich.table import Table

    table = Table(title=_title(plan), caption=_caption(plan))
    header, *rows = _rows(plan)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i in (1, 3, 4) else "right")
    for row in rows:
        table.add_row(*row)
    return table
