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
from orchestrator.chain.streams import run_stream
from orchestrator.chain.session import Session
from orchestrator.chain.shard import Shard
from orchestrator.chain.passes import Dense, Score

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
    """Scores candidate allocations: one stream of the search windows per candidate.

    The chain takes the streams as it takes many (`Chain.score_streams`): raced, every shard busy on
    Ray, and with `early_stop` a candidate whose running sum exceeds the best finished total is
    stopped (exact: `streams.race_streams`); offloaded shards take them block-major instead (each block
    moves to the device once per step, every candidate scored to the end; same scores and choice).
    `block_major` overrides the chain's choice (benchmarks).
    """

    def __init__(self, session: Session, windows, opts: PruneOptions, *, early_stop: bool = True,
                 on_candidate: Callable | None = None, block_major: bool | None = None):
        self.session, self.windows, self.opts, self.early_stop = session, windows, opts, early_stop
        self.block_major = block_major
        self.hidden = session.embed(windows)
        self._reversed = None
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

        outcomes = self.session.chain.score_streams(
            candidates, task_for, hidden, first=first, early_stop=self.early_stop and not reverse,
            on_done=None if reverse else lambda key, o: self.on_candidate(step, key, score(o)),
            block_major_passes=self.block_major)
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
