"""The chain of shards: the one interface the driver pushes work through, whatever runs the shards.

A chain calls a `Shard` method by reference on shard i and returns a handle: `chain.call(i,
Shard.embed, ids)`. Handles of one shard's output are passed straight to the next shard (on Ray, as
object refs: hidden states go actor to actor, never through the driver). A method marked
`two_results` returns two handles (hidden states, record). `chain.configure(...)` is a call that
sets actor state: the one kind of call a chain replays on a restarted actor (the replay policy).

How several streams travel is the chain's choice, made once at construction: offloaded shards take
them block-major (each block moves to the device once per pass), others pipeline or race them.
Implementations: `LocalChain` (orchestrator.chain.local: calls run at once in this process) and
`RayChain` (orchestrator.chain.actors: one actor per shard, K streams in flight keep every shard busy).
A new executor implements the abstract members and inherits the passes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.chain.placement import Placement
from orchestrator.chain.shard import Shard
from orchestrator.chain.streams import StreamOutcome, block_major, priority_order, race_streams

BLOCK_MAJOR_BYTES = 2 * 2**30  # hidden states an offloaded pass holds at once (one block move each)


class Chain(ABC):
    """Shards in a fixed order, each holding a contiguous run of decoder blocks.

    Attributes:
        n_shards: how many shards.
        in_process: the shards live in this process (their files and devices are the driver's).
        parallel: calls on different shards run at the same time, so streams overlap.
        block_major: the shards are offloaded: several streams go block by block (set at construction).
        placement: where Ray put the shards' devices; None in process.
        recoveries: shards restarted and replayed so far.
    """

    n_shards: int
    in_process: bool
    parallel: bool
    block_major: bool = False
    placement: Placement | None = None
    recoveries: int = 0

    @abstractmethod
    def call(self, shard: int, method: Callable, *args) -> Any:
        """Submit `method` (a `Shard` method) on shard `shard`; a handle (a tuple for `two_results`)."""

    @abstractmethod
    def configure(self, shard: int, method: Callable, *args) -> Any:
        """A call that sets shard state: replayed, in order, on a restarted shard."""

    @abstractmethod
    def wait(self, handles: Sequence[Any]) -> list[Any]:
        """Those of `handles` that are ready (at least one)."""

    @abstractmethod
    def get(self, handle: Any) -> Any:
        """The value of a handle (recovering a lost shard where the chain can)."""

    @abstractmethod
    def set_progress(self, callback: Callable[[str, int], None]) -> None:
        """Call `callback(kind, block)` for every block a shard finishes."""

    @abstractmethod
    def check_plugins(self, names: dict[str, str]) -> None:
        """Every shard can load the plug-ins `names` ({field: name}), in this process's versions."""

    @abstractmethod
    def release(self) -> None:
        """Free the shards' devices for other work; the chain takes no calls after this. Idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Release the shards and whatever the chain started."""

    # ------------------------------------------------------------------ passes: the chain's choice

    def score_streams(self, keys: Sequence, task_for: Callable[[Any, int, float], Any], hidden0: Any, *, first,
                      early_stop: bool = True, on_done: Callable | None = None,
                      block_major_passes: bool | None = None) -> dict[Any, StreamOutcome]:
        """One scoring stream per key (`task_for(key, shard, bound)`), every one scored to its total or
        stopped once it cannot win (`streams.race_streams`, likely winners from `first` outward).

        Offloaded shards take every stream block-major instead (each block moves once per call; no
        early stop: same scores and choice). `block_major_passes` overrides the choice (benchmarks).
        """
        keys = list(keys)
        if self.block_major if block_major_passes is None else block_major_passes:
            _, records = block_major(self, lambda i: [task_for(k, i, math.inf) for k in keys], hidden0)
            outcomes = {k: StreamOutcome(k, rec[-1].partial, rec[-1].partial, rec) for k, rec in zip(keys, records)}
            if on_done is not None:
                for k in keys:
                    on_done(k, outcomes[k])
            return outcomes
        return race_streams(self, priority_order(keys, first), task_for, hidden0,
                            max_in_flight=self.n_shards + 1 if self.parallel else 1, early_stop=early_stop,
                            on_done=on_done)

    def nll_sum(self, chunks: Sequence, forward_task: Any, *, chunk_bytes: int) -> float:
        """Σ next-token NLL of the token windows in `chunks` (each [batch, seqlen]) through every shard.

        Pipelined: at most 2 chunks per shard in flight, so no shard's outputs pile up (on Ray every
        shard works on a different chunk at once). Offloaded: block-major in groups of up to
        BLOCK_MAJOR_BYTES of hidden states (`chunk_bytes` each), so each block moves to the device once
        per group.
        """
        total, last = 0.0, self.n_shards - 1
        if self.block_major:
            per_group = max(1, BLOCK_MAJOR_BYTES // chunk_bytes)
            for g in range(0, len(chunks), per_group):
                group = chunks[g : g + per_group]
                wires = [self.get(self.call(0, Shard.embed, c)) for c in group]
                hidden, _ = block_major(self, lambda _shard: [forward_task for _ in group], wires)
                nlls = [self.call(last, Shard.nll, h, c) for h, c in zip(self.get(hidden), group)]
                for h in nlls:
                    total += self.get(h)[0]
            return total
        pending = []
        for chunk in chunks:
            hidden = self.call(0, Shard.embed, chunk)
            for k in range(self.n_shards):
                hidden, _ = self.call(k, Shard.run, forward_task, hidden, 0.0)
            pending.append(self.call(last, Shard.nll, hidden, chunk))
            if len(pending) > 2 * self.n_shards:  # back-pressure: a fast first shard does not run ahead
                total += self.get(pending.pop(0))[0]
        for h in pending:
            total += self.get(h)[0]
        return total
