"""NeuroAL driver: λ candidates as streams through the shards → per-layer scores → best λ.

Reference: eliacunegatti/NeuroAL `sparsity_distribution.get_neuroal_sparsity_distribution`.
Block step: one stream of the 8 search windows per λ; each block scores the candidate
(`neuroal.block.score_block`) and passes its sparse output on; the candidate's score is the sum of
the per-linear alignment metrics, the lowest wins (ties: the first λ in the reference's order). The
row step does the same over per-row ratios built from the best block candidate's activation change.

Speed (DESIGN §7): candidates race through the chain `max_in_flight` at a time and a candidate whose
running sum already exceeds the best finished total is stopped (exact; see `race_streams`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from neuroal.allocation import ratios as R
from neuroal.allocation.schedule import block_lambdas, neuroal_block_sparsity, row_lambdas
from neuroal.block import PruneOptions
from neuroal.families import Family
from orchestrator.pipeline import race_streams
from orchestrator.shard import StreamTask

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    ratios: R.Ratios
    lambda_block: float | None = None
    lambda_row: float | None = None
    curves: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    step_run: str = "both"


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


def _pick(outcomes, lambdas) -> float:
    finished = [(outcomes[lam].total, k, lam) for k, lam in enumerate(lambdas) if outcomes[lam].total is not None]
    return min(finished)[2]


def _curve(outcomes, lambdas) -> list[dict]:
    return [
        {"lambda": lam, "score": outcomes[lam].partial, "complete": outcomes[lam].total is not None}
        for lam in lambdas
    ]


def _alignment(outcome) -> dict[int, dict]:
    return {b: rec.alignment for run in outcome.records for b, rec in run.records.items()}


class NeuroALSearch:
    """Runs the block and row steps over a chain whose shards hold the model's blocks."""

    def __init__(
        self,
        chain,
        family: Family,
        shard_blocks: list[range],
        shapes: dict[str, tuple[int, int]],
        sparsity: float,
        opts: PruneOptions,
        *,
        early_stop: bool = True,
        max_in_flight: int | None = None,
        on_candidate=None,
    ):
        self.chain = chain
        self.family = family
        self.shard_blocks = shard_blocks
        self.n_blocks = shard_blocks[-1].stop
        self.shapes = shapes
        self.sparsity = sparsity
        self.opts = opts
        self.early_stop = early_stop
        self.max_in_flight = max_in_flight or max(1, chain.n_shards + 1)
        self.on_candidate = on_candidate or (lambda step, lam, outcome: None)

    def _race(self, step: str, lambdas, ratios_for, hidden, want_alignment: bool, first):
        ratios = {lam: ratios_for(lam) for lam in lambdas}

        def task_for(lam, shard, bound):
            blocks = self.shard_blocks[shard]
            return StreamTask(
                kind="score",
                ratios={b: ratios[lam][b] for b in blocks},
                opts=self.opts,
                want_alignment=want_alignment,
                stop_above=bound,
            )

        order = priority_order(lambdas, first)
        outcomes = race_streams(
            self.chain, order, task_for, hidden, max_in_flight=self.max_in_flight, early_stop=self.early_stop
        )
        for lam in lambdas:
            self.on_candidate(step, lam, outcomes[lam])
        return outcomes, ratios

    def run(self, hidden, step: str, *, block_first: float = 0.08, row_first: float = 0.0) -> SearchResult:
        """Search on the embedded search windows `hidden` (a chain handle).

        Args:
            step: "block", "row" or "both"; the row step is skipped (with a note) for solver
                methods (as the reference) and for families without a row map (Mamba).
        """
        notes = []
        base_method = self.opts.base
        run_row = step in ("row", "both")
        run_block = step in ("block", "both")
        if run_row and base_method.solver is not None:
            notes.append(f"{base_method.name}: NeuroAL runs the block step only, as the reference code")
            run_row, run_block = False, True
        if run_row and not self.family.has_row_step:
            notes.append(f"{self.family.name}: no producer/consumer map, NeuroAL runs the block step only")
            run_row, run_block = False, True
        result = SearchResult(ratios={}, notes=notes, step_run="both" if run_block and run_row else "block" if run_block else "row")
        linears = self.family.linears

        def block_ratios(lam):
            return R.per_block(neuroal_block_sparsity(self.n_blocks, self.sparsity, lam), linears)

        t0 = time.perf_counter()
        if run_block:
            lambdas = block_lambdas(self.sparsity)
            outcomes, ratios = self._race("block", lambdas, block_ratios, hidden, run_row, block_first if block_first in lambdas else lambdas[0])
            best = _pick(outcomes, lambdas)
            result.lambda_block = best
            result.curves["block"] = _curve(outcomes, lambdas)
            base, base_outcome = ratios[best], outcomes[best]
        else:  # row step only: the alignment comes from the uniform block distribution (λ = 0)
            outcomes, ratios = self._race("block", [0.0], block_ratios, hidden, True, 0.0)
            base, base_outcome = ratios[0.0], outcomes[0.0]
        result.timings_s["search_block"] = time.perf_counter() - t0
        result.ratios = base
        if not run_row:
            return result

        t0 = time.perf_counter()
        alignment = _alignment(base_outcome)
        row_notes: list[str] = []

        def row_ratios(lam):
            r, n = R.neuroal_rows(self.family, self.shapes, base, alignment, lam)
            row_notes[:] = n
            return r

        lambdas = row_lambdas()
        outcomes, ratios = self._race("row", lambdas, row_ratios, hidden, False, row_first)
        best = _pick(outcomes, lambdas)
        result.lambda_row = best
        result.curves["row"] = _curve(outcomes, lambdas)
        result.ratios = ratios[best]
        result.notes.extend(row_notes)
        result.timings_s["search_row"] = time.perf_counter() - t0
        return result
