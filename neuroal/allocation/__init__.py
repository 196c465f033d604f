"""Sparsity allocation ("top-ups"): how the target sparsity is spread over blocks, linears and rows.

Any top-up works over any base method. Each is a registered `Allocator` that declares the evidence it
needs (`neuroal.allocation.base`); the orchestrator collects that evidence generically and the
allocator turns it into ratios here, in pure code:

| top-up   | evidence                                  | gives                                   |
|----------|-------------------------------------------|-----------------------------------------|
| uniform  | nothing                                   | s for every linear                      |
| owl      | block statistics (Wanda outlier ratios)   | a ratio per block (OWL, Yin et al.)     |
| alpha    | weights (ESD heavy-tail α per linear)     | a ratio per block (AlphaPruning)        |
| dsnot    | nothing; the DSnoT mask refiner           | uniform ratios, masks refined by DSnoT  |
| neuroal  | candidate alignment scores (the λ search) | block ratios, then per-row ratios       |
"""

from neuroal.allocation.base import (  # noqa: F401
    ALLOCATORS,
    Allocation,
    AllocationProblem,
    Allocator,
    CandidateScore,
    CandidateScorer,
    Evidence,
    check_nm,
)
from neuroal.allocation import alpha, neuroal, owl, uniform  # noqa: F401,E402  (register the built-ins)
