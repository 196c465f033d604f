"""The ways streams go through a chain of shards (`orchestrator.chain.Chain`), the same driver code
in-process and on Ray: one stream in order, several block-major, or many raced with an exact early stop.
Which one a pass uses is the chain's choice (`Chain.score_streams`, `Chain.nll_sum`).

>>> from orchestrator.chain.local import LocalChain
>>> class Echo:  # any object with Shard's method names
...     def run(self, task, x, partial): return x + 1, {"seen": x}
>>> chain = LocalChain([Echo(), Echo()])
>>> out, records = run_stream(chain, "task", 1)
>>> chain.get(out), records
(3, [{'seen': 1}, {'seen': 2}])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.chain.shard import Shard

logger = logging.getLogger(__name__)


def num_returns(method: Callable) -> int:
    return getattr(method, "num_returns", 1)


def run_stream(chain, task, hidden) -> tuple[Any, list]:
    """One stream through every shard in order; returns (output handle, records per shard).

    `task` is one task for every shard, or a function shard index -> task.
    """
    task_for = task if callable(task) else (lambda _shard: task)
    records = []
    for i in range(chain.n_shards):
        hidden, rec = chain.call(i, Shard.run, task_for(i), hidden, 0.0)
        records.append(rec)
    return hidden, [chain.get(r) for r in records]


def priority_order(values, first) -> list:
    """`first` then its neighbours alternately outward: likely winners finish first.

    >>> priority_order([1, 2, 3, 4, 5], 3)
    [3, 4, 2, 5, 1]
    """
    values = list(values)
    i = values.index(first)
    out = [values[i]]
    for d in range(1, len(values)):
        for j in (i + d, i - d):
            if 0 <= j < len(values):
                out.append(values[j])
    return out


def block_major(chain, tasks_for: Callable[[int], list], hidden0: Any) -> tuple[Any, list[list]]:
    """Several streams through the chain block-major (`Shard.run_many`): each shard takes all of them
    through block b before block b+1, so an offloaded block moves to the device once per pass.

    Args:
        tasks_for: shard index -> one task per stream (the same streams, in the same order).
        hidden0: the input every stream starts from (one handle), or a handle to a list, one per stream.

    Returns:
        (handle to the list of outputs, per stream the `ShardRun` of each shard).
    """
    hidden, partials, records = hidden0, None, None
    for i in range(chain.n_shards):
        tasks = tasks_for(i)
        partials = partials or [0.0] * len(tasks)
        hidden, res = chain.call(i, Shard.run_many, tasks, hidden, partials)
        runs = chain.get(res)
        records = records or [[] for _ in tasks]
        for rec, run in zip(records, runs):
            rec.append(run)
        partials = [run.partial for run in runs]
    return hidden, records


@dataclass
class StreamOutcome:
    key: Any
    total: float | None  # None when stopped early
    partial: float  # the sum when it finished or stopped
    records: list  # per shard ShardRun, only for finished streams


def race_streams(
    chain,
    keys: Sequence[Any],
    task_for: Callable[[Any, int, float], Any],
    hidden0: Any,
    *,
    max_in_flight: int,
    early_stop: bool = True,
    on_done: Callable[[Any, StreamOutcome], None] | None = None,
) -> dict[Any, StreamOutcome]:
    """Run one scoring stream per key through the chain, `max_in_flight` at a time; stop losers.

    Each shard adds its blocks' non-negative per-linear scores to the stream's running sum, in
    block and linear order (the same float additions whatever the sharding). A stream whose sum
    already exceeds the best finished total cannot win or tie, so it stops there, also inside a
    shard between two blocks (`task_for(key, shard, bound)` puts the bound in the task). This is
    exact: the argmin is unchanged, and ties still finish so the caller resolves them in key order.
    Streams start in the order of `keys`, so put a likely winner first. `on_done(key, outcome)` is
    called as each stream finishes or stops (progress).
    """
    waiting = list(keys)
    active: list[dict] = []
    outcomes: dict[Any, StreamOutcome] = {}
    best = float("inf")

    def submit(st: dict, hidden):
        bound = best if early_stop else float("inf")
        task = task_for(st["key"], st["shard"], bound)
        st["out"], st["res"] = chain.call(st["shard"], Shard.run, task, hidden, st["partial"])

    def start_next():
        while waiting and len(active) < max_in_flight:
            st = {"key": waiting.pop(0), "shard": 0, "partial": 0.0, "records": []}
            submit(st, hidden0)
            active.append(st)

    start_next()
    while active:
        ready = {id(h) for h in chain.wait([st["res"] for st in active])}
        for st in [s for s in active if id(s["res"]) in ready]:
            result = chain.get(st["res"])
            st["partial"] = result.partial
            st["records"].append(result)
            st["shard"] += 1
            if result.stopped_at is not None or (early_stop and st["partial"] > best and st["shard"] < chain.n_shards):
                active.remove(st)
                outcomes[st["key"]] = StreamOutcome(st["key"], None, st["partial"], [])
                logger.debug("stream %s stopped at %.6g > %.6g", st["key"], st["partial"], best)
                if on_done is not None:
                    on_done(st["key"], outcomes[st["key"]])
            elif st["shard"] == chain.n_shards:
                active.remove(st)
                outcomes[st["key"]] = StreamOutcome(st["key"], st["partial"], st["partial"], st["records"])
                best = min(best, st["partial"])
                if on_done is not None:
                    on_done(st["key"], outcomes[st["key"]])
            else:
                submit(st, st["out"])
        start_next()
    return outcomes
