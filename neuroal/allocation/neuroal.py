"""NeuroAL (arXiv 2411.07066): its candidates, its protocol and its choice of λ, in pure code.

Reference: eliacunegatti/NeuroAL `sparsity_distribution.get_neuroal_sparsity_distribution`,
`lib/neuroal.py`. The orchestrator only scores the candidates it is handed (a `CandidateScorer`:
each candidate streams the search windows through the model, every block runs
`neuroal.block.score_block`, the score is the sum of the per-linear alignment metrics).

- Block step: one candidate per λ of `block_lambdas(s)`, a linear ramp [s − λ, s + λ] rising with
  depth; the lowest score wins, ties to the first λ in the reference's order (`choose`).
- Row step, on top of the best block λ: per-row ratios from that candidate's activation change
  (`row_ratios`), λ ∈ {0} ∪ the block set, scored and chosen the same way.
- SparseGPT/APT/D²Prune (solver methods) run the block step only, as the reference; so do families
  without a producer→consumer map (Mamba) and mixture-of-experts families (`Family.no_row_step` says why).
  `steps` says which steps run and why.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from neuroal.allocation import ratios as R
from neuroal.allocation.base import ALLOCATORS, Allocation, AllocationProblem, Allocator, Evidence
from neuroal.allocation.base import CandidateScore, CandidateScorer
from neuroal.allocation.schedule import block_lambdas, neuroal_block_sparsity, neuroal_row_sparsity, row_lambdas
from neuroal.errors import SpecError
from neuroal.families import Family
from neuroal.methods import METHODS, Method
from neuroal.row_map import producer_rows, row_groups

STEPS = ("block", "row", "both")
# the candidate started first (then its neighbours outward): a likely winner finishing early lets
# the exact early stop drop more losers; it never changes the choice
BLOCK_FIRST, ROW_FIRST = 0.08, 0.0


@dataclass(frozen=True)
class Steps:
    block: bool
    row: bool
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "both" if self.block and self.row else "block" if self.block else "row"


def steps(requested: str, method: Method, family: Family) -> Steps:
    """Which steps run: the request, less the row step where the reference does not run it."""
    block, row = requested in ("block", "both"), requested in ("row", "both")
    if row and method.solver is not None:
        return Steps(True, False, (f"{method.name}: NeuroAL runs the block step only, as the reference code",))
    if row and not family.has_row_step:
        why = family.no_row_step or "no producer/consumer map, NeuroAL runs the block step only"
        return Steps(True, False, (f"{family.name}: {why}",))
    return Steps(block, row)


def block_candidates(n_blocks: int, sparsity: float, linears: Sequence[str], lambdas=None) -> dict[float, R.Ratios]:
    """λ -> per-block ratios of the block step, in the reference's λ order."""
    lambdas = block_lambdas(sparsity) if lambdas is None else lambdas
    return {lam: R.per_block(neuroal_block_sparsity(n_blocks, sparsity, lam), linears) for lam in lambdas}


def row_ratios(
    family: Family,
    shapes: Mapping[str, tuple[int, int]],
    base: R.Ratios,
    alignment: Mapping[int, Mapping[str, np.ndarray]],
    lam: float,
) -> tuple[R.Ratios, list[str]]:
    """NeuroAL row step (reference `get_distribution_row`) for one λ.

    Each producer's rows get sparsities from its consumer's activation change r = a^d − a^s
    (measured at the best block λ). Every ratio is returned per row, including the uniform ones
    (last block, all-zero r, grouped-query q/k/v), because the reference prunes all of them in
    its per-row "neuron" mode.

    Returns:
        (ratios, notes): notes lists the producers kept at the block ratio by the width rule.
    """
    n_blocks = len(base)
    out: R.Ratios = {}
    kept_names: set[str] = set()
    for b in range(n_blocks):
        rows = {name: np.full(shapes[name][0], float(base[b][name])) for name in family.linears}
        if b < n_blocks - 1:
            groups, kept = row_groups(family, shapes, has_next=True)
            kept_names.update(kept)
            for consumer, producers in groups:
                if consumer.startswith("next:"):
                    r = alignment[b + 1][consumer[5:]]
                else:
                    r = alignment[b][consumer]
                r = np.asarray(r, dtype=np.float64)
                for p in producers:  # a fused producer (Phi-3's gate_up) lays r over each of its segments
                    rows[p] = neuroal_row_sparsity(producer_rows(r, family, p, shapes), float(base[b][p]), lam)
        out[b] = rows
    notes = [f"{p} keeps its block ratio (rows differ from the consumer's width)" for p in sorted(kept_names)]
    return out, notes


def row_candidates(family, shapes, base: R.Ratios, alignment) -> tuple[dict[float, R.Ratios], list[str]]:
    """λ -> per-row ratios of the row step, and the width-rule notes (the same for every λ)."""
    candidates, notes = {}, []
    for lam in row_lambdas():
        candidates[lam], notes = row_ratios(family, shapes, base, alignment, lam)
    return candidates, notes


def choose(scores: Mapping[float, CandidateScore], lambdas: Sequence[float]) -> float:
    """The λ of the lowest finished score; ties go to the first λ in `lambdas` (the reference's order)."""
    finished = [(scores[lam].total, k, lam) for k, lam in enumerate(lambdas) if scores[lam].total is not None]
    return min(finished)[2]


def curve(scores: Mapping[float, CandidateScore], lambdas: Sequence[float]) -> list[dict]:
    """Score per λ for run.json and the plot; `complete` is False for a candidate stopped early."""
    return [{"lambda": lam, "score": scores[lam].partial, "complete": scores[lam].total is not None} for lam in lambdas]


# How far float rounding alone moves the lead between two candidates, relative to the winner's score:
# the same code and windows in bfloat16, or on one thread instead of two (a stand-in for another
# machine's kernels: it changes SparseGPT's Hessian sums), shift a pairwise lead by up to 3.06%
# (benchmarks/dtype_fidelity.py over six SmolLM2 settings, Wanda 50-80% and SparseGPT 50/70%: the
# largest, SparseGPT 50%'s block step; Wanda 80%'s row step 2.88%, Wanda 70% 1.50%; issue 26's two
# machines in float32: ~1.0%), which re-scoring in reverse window order on one machine does not see
# (Wanda: 0.00% in float32). A lead inside this floor is not trusted.
ROUNDING_NOISE = 0.031


@dataclass(frozen=True)
class TieCheck:
    """How safe a step's choice is: the winner's lead over the runner-up vs the score's float noise.

    Two bounds, the larger is `noise`: `noise_reorder`, measured in this run (the best and the
    runner-up scored again with the search windows in reverse order: the same sums in another order),
    and `noise_rounding`, what other kernels or dtypes shift a lead by (`ROUNDING_NOISE` of the
    winner's score, measured offline), which one machine's re-score cannot see. A lead inside the
    noise (`near_tie`) is a coin flip between the two λ: another machine may pick the runner-up.
    """

    best: float
    runner_up: float | None
    margin: float | None  # runner-up − best (a lower bound when the runner-up was stopped early)
    noise: float | None
    near_tie: bool
    noise_reorder: float | None = None
    noise_rounding: float | None = None

    def note(self, step: str) -> str:
        return (f"{step} step: λ {self.best:g} beat λ {self.runner_up:g} by {self.margin:.3g}, within the score's "
                f"float noise ({self.noise:.3g}: re-scoring in reverse window order moved it {self.noise_reorder:.3g}, "
                f"other kernels or dtypes move a lead up to {self.noise_rounding:.3g}): the choice is a coin flip "
                f"between them, and another machine may pick λ {self.runner_up:g}")


def runner_up(scores: Mapping[float, CandidateScore], best: float) -> tuple[float | None, float | None]:
    """The λ closest to the winner and its lead: finished totals, or the partial sums of stopped ones."""
    others = [(s.total if s.total is not None else s.partial, lam) for lam, s in scores.items() if lam != best]
    if not others:
        return None, None
    value, lam = min(others)
    return lam, value - scores[best].total


def tie_check(scores, best: float, rescored: Mapping[float, CandidateScore] | None) -> TieCheck:
    """`TieCheck` of a step from its scores and the re-scores of the best two in reverse window order."""
    lam2, margin = runner_up(scores, best)
    if lam2 is None or not rescored:
        return TieCheck(best, lam2, margin, None, False)
    deltas = [abs(rescored[lam].total - scores[lam].total) for lam in (best, lam2)
              if lam in rescored and scores[lam].total is not None]
    if scores[lam2].total is None and lam2 in rescored:  # its full total is known now
        margin = min(margin, rescored[lam2].total - rescored[best].total) if best in rescored else margin
    reorder = max(deltas) if deltas else 0.0
    rounding = ROUNDING_NOISE * abs(scores[best].total)
    noise = max(reorder, rounding)
    return TieCheck(best, lam2, margin, noise, margin <= noise, reorder, rounding)


def decide(scores: Mapping[float, CandidateScore], lambdas: Sequence[float],
           rescored: Mapping[float, CandidateScore] | None = None, tie_rule: str = "lowest") -> tuple[float, TieCheck | None]:
    """A step's λ, in pure code: the lowest score (`choose`); given the best two re-scored in reverse
    window order, checked against the score's float noise (`TieCheck`), and a near tie resolved by
    `tie_rule`: "lowest" keeps the lowest score (the reference), "reference-order" takes the λ that
    comes first in the reference's order."""
    best = choose(scores, lambdas)
    if rescored is None:
        return best, None
    check = tie_check(scores, best, rescored)
    if check.near_tie and tie_rule == "reference-order" and lambdas.index(check.runner_up) < lambdas.index(best):
        return check.runner_up, check
    return best, check


@ALLOCATORS.register("neuroal")
@dataclass(frozen=True)
class NeuroAL(Allocator):
    """NeuroAL: `neuroal prune --top-up neuroal --neuroal-step both` (grid knob `search_windows`, 8).

    The search runs on the first `windows` calibration windows (the reference's 8 of its 128).
    """

    step: str = "both"
    windows: int = 8
    tie_check: bool = True  # re-score the best two of each step in reverse window order (≈ 2 more candidates)
    tie_rule: str = "lowest"  # "lowest" (the reference) or "reference-order": a near tie goes to the earlier λ

    evidence = Evidence.ALIGNMENT
    knobs = {"step": "neuroal_step", "windows": "search_windows", "tie_check": "neuroal_tie_check",
             "tie_rule": "neuroal_tie_rule"}
    summary = "NeuroAL: λ search for block then row sparsity by activation alignment"

    @classmethod
    def check(cls, fields, explicit) -> None:
        method = METHODS.get(fields["method"])
        if fields.get("neuroal_step") == "row" and method.solver is not None and "neuroal_step" in explicit:
            raise SpecError("--neuroal-step", "row", f"block with --method {method.name} (as the reference, block step only)")

    @property
    def evidence_windows(self) -> int:
        return self.windows

    def _rescore(self, step: str, score: CandidateScorer, candidates, scores, lambdas):
        """The best two candidates scored again with the windows in reverse order (None: no tie check;
        empty: no runner-up to check against)."""
        if not self.tie_check:
            return None
        best = choose(scores, lambdas)
        lam2, _ = runner_up(scores, best)
        if lam2 is None:
            return {}
        return score(step, {lam: candidates[lam] for lam in (best, lam2)}, first=best, want_alignment=False,
                     reverse=True)

    @staticmethod
    def _record(step: str, scores, lambdas, chosen: float, check: TieCheck | None, result: Allocation) -> None:
        result.curves[step] = curve(scores, lambdas)
        if check is None:
            return
        result.extra.setdefault("tie_check", {})[step] = dataclasses.asdict(check)
        if check.near_tie:
            result.notes.append(check.note(step))
            if chosen != check.best:
                result.notes.append(f"{step} step: near tie resolved to λ {chosen:g}, the earlier in the reference's order")

    def allocate(self, problem: AllocationProblem, score: CandidateScorer) -> Allocation:
        st = steps(self.step, problem.method, problem.family)
        result = Allocation(ratios={}, notes=list(st.notes), step_run=st.name)
        timings = result.extra.setdefault("timings_s", {})
        t0 = time.perf_counter()
        if st.block:
            candidates = block_candidates(problem.n_blocks, problem.sparsity, problem.linears)
            lambdas = list(candidates)
            scores = score("block", candidates, first=BLOCK_FIRST if BLOCK_FIRST in lambdas else lambdas[0],
                           want_alignment=st.row)
            rescored = self._rescore("block", score, candidates, scores, lambdas)
            best, check = decide(scores, lambdas, rescored, self.tie_rule)
            self._record("block", scores, lambdas, best, check, result)
            result.lambda_block = best
        else:  # row step only: the alignment comes from the uniform block distribution (λ = 0)
            candidates = block_candidates(problem.n_blocks, problem.sparsity, problem.linears, lambdas=(0.0,))
            scores = score("block", candidates, first=0.0, want_alignment=True)
            best = 0.0
        base, base_score = candidates[best], scores[best]
        timings["search_block"] = time.perf_counter() - t0
        result.ratios = base
        if not st.row:
            return result

        t0 = time.perf_counter()
        candidates, notes = row_candidates(problem.family, problem.shapes, base, base_score.alignment)
        lambdas = list(candidates)
        scores = score("row", candidates, first=ROW_FIRST, want_alignment=False)
        rescored = self._rescore("row", score, candidates, scores, lambdas)
        best, check = decide(scores, lambdas, rescored, self.tie_rule)
        self._record("row", scores, lambdas, best, check, result)
        result.lambda_row = best
        result.ratios = candidates[best]
        result.notes.extend(notes)
        timings["search_row"] = time.perf_counter() - t0
        return result
