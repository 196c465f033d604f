"""One collector per kind of allocator evidence (`neuroal.allocation.Evidence`), built on the streams.

Collectors know evidence kinds, never top-up names: an allocator declares what it needs and gets
it here (`collect`), then computes its ratios in pure `neuroal/` code.

- NOTHING: None.
- BLOCK_STATS: one dense stream of the calibration windows; each block's `block_summary` runs on its
  shard, the summaries come back in block order.
- WEIGHTS: every shard maps `weight_summary` over its prunable weights, no data.
- ALIGNMENT: a `StreamScorer`, which races candidate allocations through the chain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from neuroal.allocation import Allocator, CandidateScore, Evidence
from neuroal.block import PruneOptions
from orchestrator.pipeline import StreamOutcome, block_major, priority_order, race_streams, run_stream
from orchestrator.session import Session
from orchestrator.shard import Shard
from orchestrator.tasks import Dense, Score

logger = logging.getLogger(__name__)


def _windows(calib, allocator: Allocator):
    n = allocator.evidence_windows
    return calib if n is None else calib[:n]


def _nothing(allocator, session, calib, opts, **_):
    return None


def _block_stats(allocator, session: Session, calib, opts: PruneOptions, **_):
    task = Dense(kinds=allocator.stats_kinds, summary=allocator.block_summary, max_tokens=opts.max_tokens,
                 experts=opts.experts)
    runs = run_stream(session.chain, task, session.embed(_windows(calib, allocator)))[1]
    return [run.records[b].summary for run in runs for b in sorted(run.records)]


def _weights(allocator, session: Session, calib, opts, **_):
    chain, out = session.chain, {}
    handles = [chain.call(i, Shard.weight_summaries, allocator.weight_summary) for i in range(chain.n_shards)]
    for h in handles:
        out.update(chain.get(h))
    return out


class StreamScorer:
    """Scores candidate allocations: one stream of the search windows per candidate, raced.

    Candidates race through the chain `max_in_flight` at a time (every shard busy on Ray), and
    with `early_stop` a candidate whose running sum exceeds the best finished total is stopped
    (exact: `pipeline.race_streams`). When the shards are offloaded all candidates go block-major
    instead (`pipeline.block_major`): each block moves to the device once per step, the early stop
    is given up (every candidate is scored to the end), the scores and the choice are the same.
    """

    def __init__(self, session: Session, windows, opts: PruneOptions, *, early_stop: bool = True,
                 on_candidate: Callable | None = None, block_major: bool | None = None):
        self.session, self.windows, self.opts, self.early_stop = session, windows, opts, early_stop
        self.block_major = session.offload != "none" if block_major is None else block_major
        self.hidden = session.embed(windows)
        self._reversed = None
        self.max_in_flight = session.chain.n_shards + 1 if session.parallel else 1
        self.on_candidate = on_candidate or (lambda step, key, score: None)

    def __call__(self, step: str, candidates: Mapping, *, first, want_alignment: bool, reverse: bool = False) -> dict:
        if reverse and self._reversed is None:
            self._reversed = self.session.embed(self.windows.flip(0))
        hidden = self._reversed if reverse else self.hidden

        def task_for(key, shard, bound):
            return Score(ratios=self.session.ratios_of(shard, candidates[key]), opts=self.opts,
                         want_alignment=want_alignment, stop_above=bound)

        def score(o) -> CandidateScore:
            alignment = None
            if want_alignment and o.total is not None:
                alignment = {b: rec.alignment for run in o.records for b, rec in run.records.items()}
            return CandidateScore(o.total, o.partial, alignment)

        if self.block_major:  # each offloaded block moves once per step
            keys = list(candidates)
            _, records = block_major(self.session.chain, lambda i: [task_for(k, i, float("inf")) for k in keys], hidden)
            outcomes = {k: StreamOutcome(k, rec[-1].partial, rec[-1].partial, rec) for k, rec in zip(keys, records)}
            if not reverse:
                for k in keys:
                    self.on_candidate(step, k, score(outcomes[k]))
        else:
            outcomes = race_streams(self.session.chain, priority_order(list(candidates), first), task_for, hidden,
                                    max_in_flight=self.max_in_flight, early_stop=self.early_stop and not reverse,
                                    on_done=None if reverse else lambda key, o: self.on_candidate(step, key, score(o)))
        return {key: score(outcomes[key]) for key in candidates}


def _alignment(allocator, session: Session, calib, opts: PruneOptions, *, early_stop=True, on_candidate=None):
    return StreamScorer(session, _windows(calib, allocator), opts, early_stop=early_stop, on_candidate=on_candidate)


COLLECTORS = {
    Evidence.NOTHING: _nothing,
    Evidence.BLOCK_STATS: _block_stats,
    Evidence.WEIGHTS: _weights,
    Evidence.ALIGNMENT: _alignment,
}


def collect(allocator: Allocator, session: Session, calib, opts: PruneOptions, *, early_stop: bool = True,
            on_candidate: Callable | None = None):
    """The evidence `allocator` declared, collected on the session's shards."""
    return COLLECTORS[allocator.evidence](allocator, session, calib, opts, early_stop=early_stop,
                                          on_candidate=on_candidate)
