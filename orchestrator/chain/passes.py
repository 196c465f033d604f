"""Stream tasks: what one stream asks of every block it passes through, as typed records.

A shard runs `task.run_block(shard, b, hidden, run)` for each of its blocks in order, then
`task.finish(shard)`; all the math is `neuroal.block`. A task travels to the actor by value (it is
small: ratios and options, never hidden states), so adding a kind of pass is one class here.

- `Forward`: plain forward (evaluation, dense propagation).
- `Dense`: dense statistics summarised per block by an allocator (OWL's outlier ratio).
- `Score`: one NeuroAL-style candidate; stops once its running score exceeds `stop_above`.
- `Prune`: the final pass: prune in place (or restore from a checkpoint), then checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from neuroal import block as B
from neuroal import stats as S
from neuroal.allocation.ratios import Ratios, to_tensor


@dataclass
class ShardRun:
    """What one shard returns for one stream (small; hidden states travel separately)."""

    records: dict[int, B.BlockResult] = field(default_factory=dict)
    partial: float = 0.0  # running sum of the alignment metric, in block then linear order
    stopped_at: int | None = None  # block after which a `Score` stream was stopped by its bound


class StreamTask:
    max_tokens: int | None = None
    mutates = False  # the pass changes the block's weights (an offloaded block is written back)

    def run_block(self, shard, b: int, hidden: Tensor | None, run: ShardRun) -> Tensor | None:
        """Block `b` of `shard` on the stream's hidden states; returns the block's output."""
        raise NotImplementedError

    def finish(self, shard) -> None:
        """Called once the stream passed all of the shard's blocks."""


def _ratios(ratios: Ratios, b: int) -> dict:
    return {name: to_tensor(r) for name, r in ratios[b].items()}


@dataclass(frozen=True)
class Forward(StreamTask):
    max_tokens: int | None = None

    def run_block(self, shard, b, hidden, run):
        return B.forward_block(shard.blocks[b], hidden, shard.kwargs_for(b, hidden), self.max_tokens)


@dataclass(frozen=True)
class Dense(StreamTask):
    kinds: frozenset = frozenset()
    summary: Callable | None = None  # (weights, stats) -> a picklable value, run where the block is
    max_tokens: int | None = None
    experts: S.ExpertRule = field(default_factory=S.ExpertRule)  # which tokens each expert is calibrated on

    def run_block(self, shard, b, hidden, run):
        hidden, run.records[b] = B.dense_block(shard.blocks[b], shard.family, hidden, shard.kwargs_for(b, hidden),
                                               kinds=self.kinds, summary=self.summary, max_tokens=self.max_tokens,
                                               experts=self.experts)
        return hidden


@dataclass(frozen=True)
class Score(StreamTask):
    ratios: Ratios
    opts: B.PruneOptions
    want_alignment: bool = False
    stop_above: float = float("inf")

    def run_block(self, shard, b, hidden, run):
        hidden, rec = B.score_block(shard.blocks[b], shard.family, hidden, shard.kwargs_for(b, hidden),
                                    _ratios(self.ratios, b), self.opts, want_alignment=self.want_alignment)
        run.records[b] = rec
        for value in rec.metric.values():  # one float at a time: the reference's sum order
            run.partial += value
        if run.partial > self.stop_above:
            run.stopped_at = b
        return hidden


@dataclass(frozen=True)
class Prune(StreamTask):
    ratios: Ratios
    opts: B.PruneOptions
    mutates = True

    def run_block(self, shard, b, hidden, run):
        block = shard.blocks[b]
        if shard.pruned:  # restored from a checkpoint: never prune again, only propagate
            if hidden is not None:
                hidden = B.forward_block(block, hidden, shard.kwargs_for(b, hidden), self.opts.max_tokens)
            run.records[b] = B.BlockResult()
            run.records[b].sparsity, run.records[b].row_sparsity = B.block_sparsity(block, shard.family)
            return hidden
        hidden, run.records[b] = B.prune_block(block, shard.family, hidden, shard.kwargs_for(b, hidden),
                                               _ratios(self.ratios, b), self.opts)
        return hidden

    def finish(self, shard) -> None:
        shard.finish_pruning()
