"""What a plan hands out: each actor's range of blocks (`ShardSpec`), with its bytes (`ShardPlan`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from orchestrator.planning.memory import ActivationEstimate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """A contiguous range of decoder blocks held by one actor, the one range type of the project.

    The planner makes them (`Plan.shard_specs`) and `orchestrator.chain.shard.Shard` loads one; keeping a
    single type means the two cannot disagree about where a shard ends.

    Attributes:
        index: position in the chain (0 = first).
        n_shards: length of the chain.
        first_block: the first decoder block it holds.
        end_block: one past its last block (Python slice end).
        has_embeddings: holds everything before the blocks (first shard).
        has_head: holds the final norm and lm head (last shard).
    """

    index: int
    n_shards: int
    first_block: int
    end_block: int  # exclusive
    has_embeddings: bool
    has_head: bool

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.end_block)


@dataclass(frozen=True)
class ShardPlan:
    """One actor's share of the model: its range of blocks and what that range costs in bytes.

    Attributes:
        spec: the blocks it holds and whether it carries the embeddings / head; with tied
            embeddings a copy of the input embedding matrix serves as the head.
        block_param_bytes: bytes of its decoder blocks' parameters.
        param_bytes: ``block_param_bytes`` plus the embeddings / head it holds.
        activation: the activation memory estimate (`estimate_activation`).
    """

    spec: ShardSpec
    block_param_bytes: int
    param_bytes: int
    activation: ActivationEstimate

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def first_block(self) -> int:
        return self.spec.first_block

    @property
    def last_block(self) -> int:
        """The last block it holds (inclusive)."""
        return self.spec.end_block - 1

    @property
    def end_block(self) -> int:
        """One past the last block (Python slice end)."""
        return self.spec.end_block

    @property
    def blocks(self) -> range:
        return self.spec.blocks

    @property
    def n_blocks(self) -> int:
        return len(self.spec.blocks)

    @property
    def has_embeddings(self) -> bool:
        return self.spec.has_embeddings

    @property
    def has_head(self) -> bool:
        return self.spec.has_head

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
        streams_in_flight, stream_windows, seqlen, method, nsamples: what the activation estimate
            assumes (nsamples: the final pass's windows, one stream).
        block_param_bytes: bytes of each decoder block, in order.
        head_runs: the shards were balanced for passes that run the lm head (evaluation).
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
    nsamples: int = 128
    head_runs: bool = False

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

    def shard_specs(self) -> list[ShardSpec]:
        """The range of each shard, in chain order: what `orchestrator.chain.shard.Shard` is built from."""
        return [s.spec for s in self.shards]

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
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "method": self.method,
            "head_runs": self.head_runs,
            "block_param_bytes": list(self.block_param_bytes),
            "shards": [s.to_dict() for s in self.shards],
        }
