"""The allocator plug-ins: registry table, knobs from spec fields, and NeuroAL's pure choice of λ."""

import numpy as np
import pytest

from neuroal.allocation import ALLOCATORS, AllocationProblem, CandidateScore, Evidence
from neuroal.allocation.alpha import AlphaPruning
from neuroal.allocation.neuroal import ROUNDING_NOISE, NeuroAL, block_candidates, choose, curve, steps
from neuroal.allocation.owl import OWL
from neuroal.allocation.uniform import DSnoTTopUp, Uniform
from neuroal.families import family_for
from neuroal.methods import METHODS
from neuroal.refiners import REFINERS
from neuroal.refiners.dsnot import DSnoT

LLAMA = family_for(type("C", (), {"model_type": "llama"}))
MAMBA = family_for(type("C", (), {"model_type": "mamba"}))


@pytest.mark.parametrize("name,cls,evidence", [
    ("uniform", Uniform, Evidence.NOTHING),
    ("owl", OWL, Evidence.BLOCK_STATS),
    ("alpha", AlphaPruning, Evidence.WEIGHTS),
    ("dsnot", DSnoTTopUp, Evidence.NOTHING),
    ("neuroal", NeuroAL, Evidence.ALIGNMENT),
])
def test_registry_table(name, cls, evidence):
    assert ALLOCATORS.get(name) is cls and cls.evidence is evidence


def test_refiner_registry_and_the_dsnot_top_up():
    assert REFINERS.get("dsnot") is DSnoT and DSnoTTopUp.refiner == "dsnot" and Uniform.refiner is None
    assert DSnoT.from_fields({"dsnot_cycles": 7, "dsnot_same_sign": True, "owl_m": 3}) == DSnoT(max_cycles=7, same_sign=True)


def test_knobs_come_from_spec_fields():
    assert OWL.from_fields({"owl_m": 4.0, "owl_lambda": 0.1, "alpha_epsilon": 0.2}) == OWL(m=4.0, lam=0.1)
    assert NeuroAL.from_fields({"neuroal_step": "block", "search_windows": 4}).evidence_windows == 4
    assert AlphaPruning.from_fields({}) == AlphaPruning()


def test_uniform_and_owl_ratios_by_hand():
    problem = AllocationProblem(3, LLAMA.linears, {n: (4, 4) for n in LLAMA.linears}, 0.5, LLAMA, METHODS.get("wanda"))
    assert Uniform().allocate(problem).ratios == {b: {n: 0.5 for n in LLAMA.linears} for b in range(3)}
    alloc = OWL(lam=0.1).allocate(problem, [1.0, 2.0, 3.0])  # more outliers keep more weights
    assert [round(alloc.ratios[b]["mlp.up_proj"], 6) for b in range(3)] == [0.6, 0.5, 0.4]


def _score(total, partial=None):
    return CandidateScore(total, total if partial is None else partial)


def test_choose_lowest_finished_ties_to_the_reference_order():
    lambdas = [0.01, 0.02, 0.03]
    scores = {0.01: _score(None, 9.0), 0.02: _score(2.0), 0.03: _score(2.0)}
    assert choose(scores, lambdas) == 0.02
    assert choose(scores, [0.03, 0.02, 0.01]) == 0.03
    assert curve(scores, lambdas)[0] == {"lambda": 0.01, "score": 9.0, "complete": False}


def test_steps_follow_the_reference():
    assert steps("both", METHODS.get("wanda"), LLAMA).name == "both"
    st = steps("both", METHODS.get("sparsegpt"), LLAMA)
    assert (st.block, st.row) == (True, False) and "block step only" in st.notes[0]
    assert steps("row", METHODS.get("wanda"), MAMBA).name == "block"


def test_neuroal_allocate_with_a_hand_made_scorer():
    """The protocol: block candidates in the reference's λ order, then row candidates on the best."""
    problem = AllocationProblem(3, LLAMA.linears, {n: (4, 4) for n in LLAMA.linears}, 0.5, LLAMA, METHODS.get("wanda"))
    asked = []

    def scorer(step, candidates, *, first, want_alignment, reverse=False):
        if not reverse:  # the tie check's re-scores are tested below
            asked.append((step, list(candidates)[:2], first, want_alignment))
        align = {b: {n: np.arange(4.0) for n in LLAMA.linears} for b in range(3)}
        # block: λ=0.05 best; row: λ=0.0 worst, 0.12 best
        target = 0.05 if step == "block" else 0.12
        return {lam: CandidateScore(abs(lam - target), abs(lam - target), align if want_alignment else None)
                for lam in candidates}

    alloc = NeuroAL().allocate(problem, scorer)
    assert alloc.lambda_block == 0.05 and alloc.lambda_row == 0.12 and alloc.step_run == "both"
    assert asked[0] == ("block", [0.01, 0.02], 0.08, True) and asked[1] == ("row", [0.0, 0.01], 0.0, False)
    assert isinstance(alloc.ratios[0]["mlp.up_proj"], np.ndarray)  # per-row ratios
    assert alloc.ratios[2]["mlp.up_proj"] == pytest.approx(block_candidates(3, 0.5, LLAMA.linears)[0.05][2]["mlp.up_proj"])


def test_a_constructed_near_tie_is_reported_and_the_tie_rule_applies():
    """Two λ whose lead is below the score change from re-ordering the windows: the run says so."""
    problem = AllocationProblem(3, LLAMA.linears, {n: (4, 4) for n in LLAMA.linears}, 0.5, LLAMA, METHODS.get("wanda"))
    totals = {0.05: 1.0000, 0.08: 0.9999}  # 0.08 wins by 1e-4 ...
    noise = 5e-4  # ... but reordering the windows moves a score by 5e-4

    def scorer(step, candidates, *, first, want_alignment, reverse=False):
        out = {}
        for lam in candidates:
            t = totals.get(lam, 2.0 + lam) + (noise if reverse and lam == 0.08 else 0.0)
            out[lam] = CandidateScore(t, t)
        return out

    lowest = NeuroAL(step="block").allocate(problem, scorer)
    check = lowest.extra["tie_check"]["block"]
    assert lowest.lambda_block == 0.08 and check["runner_up"] == 0.05 and check["near_tie"]
    assert check["margin"] == pytest.approx(1e-4) and check["noise_reorder"] == pytest.approx(noise)
    assert check["noise"] == pytest.approx(max(noise, ROUNDING_NOISE * 0.9999))
    assert any("coin flip" in n for n in lowest.notes)
    ordered = NeuroAL(step="block", tie_rule="reference-order").allocate(problem, scorer)
    assert ordered.lambda_block == 0.05 and any("earlier in the reference's order" in n for n in ordered.notes)
    totals[0.08] = 0.95  # a clear lead (5%, above what rounding moves): no note, the lowest wins under both rules
    clear = NeuroAL(step="block", tie_rule="reference-order").allocate(problem, scorer)
    assert clear.lambda_block == 0.08 and not clear.extra["tie_check"]["block"]["near_tie"]


def test_decide_is_a_pure_choice_by_hand():
    """λ chosen with no chain: lowest total; a lead inside the noise (the re-scoring's, or rounding's
    floor) is a near tie that "reference-order" gives to the earlier λ; stopped candidates never win."""
    from neuroal.allocation.neuroal import decide

    lambdas = [0.01, 0.02, 0.03]
    scores = {0.01: CandidateScore(5.0, 5.0), 0.02: CandidateScore(4.8, 4.8), 0.03: CandidateScore(None, 6.0)}
    assert decide(scores, lambdas) == (0.02, None)
    noisy = {0.01: CandidateScore(5.3, 5.3), 0.02: CandidateScore(4.8, 4.8)}  # 0.01 moved by 0.3 > lead 0.2
    lam, check = decide(scores, lambdas, noisy)
    assert lam == 0.02 and check.near_tie and check.runner_up == 0.01
    assert check.margin == pytest.approx(0.2) and check.noise == check.noise_reorder == pytest.approx(0.3)
    assert decide(scores, lambdas, noisy, "reference-order")[0] == 0.01
    steady = {0.01: CandidateScore(5.0, 5.0), 0.02: CandidateScore(4.8, 4.8)}  # a 4% lead, no re-scoring noise
    assert decide(scores, lambdas, steady, "reference-order") == (0.02, decide(scores, lambdas, steady)[1])
    assert not decide(scores, lambdas, steady)[1].near_tie
    # a 1% lead that re-scoring does not move is still inside rounding's floor (3.1% of the winner's 4.95)
    close = {0.01: CandidateScore(5.0, 5.0), 0.02: CandidateScore(4.95, 4.95)}
    lam, check = decide({**scores, **close}, lambdas, close)
    assert lam == 0.02 and check.noise_reorder == 0.0 and check.noise == pytest.approx(ROUNDING_NOISE * 4.95)
    assert check.near_tie and decide({**scores, **close}, lambdas, close, "reference-order")[0] == 0.01


def test_the_rounding_floor_covers_every_lead_movement_measured():
    """ROUNDING_NOISE is at least the most a change of dtype or thread count moved a pairwise lead in the
    committed measurement (benchmarks/dtype_fidelity.py, six SmolLM2 settings): a floor below it would call
    a lead real that another machine may reverse."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "dtype_fidelity_variants.json"
    spread = json.loads(results.read_text())["spread"]
    moved = [m for s in spread for m in s["lead_movement"].values()]
    assert len(spread) == 6 and moved
    assert max(moved) <= ROUNDING_NOISE < 2 * max(moved)  # covers it, and not by a factor that hides real leads
