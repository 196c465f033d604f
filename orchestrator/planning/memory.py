"""The activation-memory model: what one actor needs on its accelerator besides its weights."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from orchestrator.planning.layout import BlockLayout

logger = logging.getLogger(__name__)

STATS_BYTES = 4  # fp32 statistics (neuroal.stats.STATS_DTYPE)
# sort-based masks on the widest linear: fp32 score + fp32 sorted values + int64 indices + bool mask
MASK_BYTES_PER_WEIGHT = 4 + 4 + 8 + 1
# OBS solver workspace on the widest linear: damped H copy, its Cholesky factor, H⁻¹, H⁻¹'s factor
SOLVER_HESSIAN_COPIES = 4
# logits of one window: compute dtype + fp32 upcast + fp32 log-softmax
LOGITS_EXTRA_BYTES = 4 + 4


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


def logits_bytes(seqlen: int, vocab_size: int, dtype_bytes: int) -> int:
    """Bytes of one window's logits on the last shard: ``S · V · (e + 8)`` (see `estimate_activation`)."""
    return seqlen * vocab_size * (dtype_bytes + LOGITS_EXTRA_BYTES)


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
    final_windows: int = 0,
) -> ActivationEstimate:
    """Estimate the activation memory of one actor whose largest block is `block`.

    Notation: e = bytes per element of the compute dtype, K = streams in flight, W = windows per
    stream, N = windows of the final pass (`final_windows`, nsamples), S = seqlen, d = hidden size,
    T = min(W·S, micro_tokens) tokens per block call, and for the block's prunable linears
    (out_i, in_i); P = the block's parameter count, V = vocab size::

        streams        = max((K + 1) · W, 2 · N) · S·d · e
                                                     the search: K resident stream inputs + the
                                                     output buffer of the stream being computed;
                                                     the final pass (and OWL's statistics): all N
                                                     windows as one stream, its input and its
                                                     output (`neuroal.block.forward_block`)
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

    Mixture-of-experts blocks (E experts, top-k routing; the expert matrices are among the linears,
    one per expert slice, see `BlockLayout`) change two terms; every per-linear term above stays
    per expert matrix, since the code keeps those whatever the routing: the running sums, the
    [in, in] Hessian of every expert's gate_up and down (SparseGPT/APT; `neuroal.stats` keeps one
    per unit for the whole block), the widest input's fp32 upcast (an expert can be routed all T
    tokens, and `ExpertRule.calibrate_all` hands each expert every token, one expert at a time)::

        working_set    = T · (Σ_dense out_i + max in_i + 2d + k/E · Σ_experts (out_i + in_i)) · e
                                                     each token reaches k experts, so the routed
                                                     (token, expert) pairs number T·k whatever the
                                                     balance, not T·E: charging every expert every
                                                     token overstates the expert part E/k-fold (4x
                                                     Mixtral-8x7B, 16x Qwen3-30B-A3B). Per pair the
                                                     fused kernel (transformers' grouped_mm, which
                                                     runs all T·k pairs at once) holds the gathered
                                                     input (d), gate_up's output (2I), act(gate)·up
                                                     (I) and down's output (d): Σ (out + in) of one
                                                     expert's matrices. The eager per-expert loop
                                                     holds one expert's pairs at a time, less.
        candidate_copy = (P + P_experts) · e         `neuroal.block.score_block` builds every
                                                     unit's pruned weights, then clones each fused
                                                     expert parameter whole to write them in; the
                                                     two coexist until the pruned ones are dropped

    Only one stream is computed at a time per actor (Ray actors run one method call at a time),
    so the working set, statistics and workspaces are counted once; the other K−1 streams only
    hold their hidden states. The final pass comes after the search, never beside it. Attention
    is assumed fused (SDPA flash / memory-efficient kernels on GPU): no [S, S] score matrix.

    It is an estimate: the caller leaves a `headroom` fraction of each accelerator unplanned
    (default 10%) for the CUDA context (~0.5–1 GB), caching-allocator fragmentation, NCCL buffers
    and the estimate's own error (not yet measured on a GPU; `tests/orchestrator/pruning/test_real_model.py`
    compares it with the actors' measured peak on CPU).

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
        streams=max((streams_in_flight + 1) * stream_windows, 2 * final_windows) * seqlen * hidden_size * e,
        # MoE: only the routed (token, expert) pairs' activations, k/E of all experts' (see above)
        working_set=tokens * (block.dense_sum_out + block.routed_width + block.max_in + 2 * hidden_size) * e,
        stats_upcast=2 * tokens * block.max_in * STATS_BYTES,
        linear_stats=4 * block.sum_in * STATS_BYTES,
        hessians=hessians,
        candidate_copy=(block.params + block.expert_params) * e,
        mask_workspace=block.max_weight * MASK_BYTES_PER_WEIGHT,
        logits=logits_bytes(seqlen, vocab_size, e) if with_head else 0,
    )
