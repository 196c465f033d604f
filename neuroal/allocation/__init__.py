"""Sparsity allocation ("top-ups"): how the target sparsity is spread over blocks, linears and rows.

Any top-up works over any base method. They differ in what they need:

| top-up   | needs                                   | gives                                   |
|----------|-----------------------------------------|-----------------------------------------|
| uniform  | nothing                                 | s for every linear                      |
| owl      | a dense pass (Wanda outlier ratios)      | a ratio per block (OWL, Yin et al.)     |
| alpha    | the weights (ESD heavy-tail α)           | a ratio per block (AlphaPruning)        |
| dsnot    | calibration moments in the final pass    | uniform ratios, masks refined by DSnoT  |
| neuroal  | the λ search (streams of 8 windows)      | block ratios, then per-row ratios       |

The orchestrator runs the data flow each needs; the math lives in this package's modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroal.registry import Registry


@dataclass(frozen=True)
class TopUp:
    name: str
    needs: str  # "nothing" | "dense_pass" | "weights" | "final_pass" | "search"
    supports_nm: bool  # does a varying ratio make sense with an N:M pattern?
    doc: str


TOPUPS: Registry[TopUp] = Registry("--top-up")
for _t in (
    TopUp("uniform", "nothing", True, "the same sparsity for every prunable linear"),
    TopUp("owl", "dense_pass", False, "OWL: block sparsity from the Wanda outlier ratio (M=5, λ=0.08)"),
    TopUp("alpha", "weights", False, "AlphaPruning: block sparsity from the ESD heavy-tail exponent (ε=0.3)"),
    TopUp("dsnot", "final_pass", True, "DSnoT: uniform sparsity, masks refined by prune-and-grow"),
    TopUp("neuroal", "search", False, "NeuroAL: λ search for block then row sparsity by activation alignment"),
):
    TOPUPS.register(_t.name)(_t)
