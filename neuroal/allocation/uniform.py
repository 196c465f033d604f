"""Uniform sparsity, and DSnoT's top-up (uniform ratios whose masks the DSnoT refiner improves)."""

from __future__ import annotations

from dataclasses import dataclass

from neuroal.allocation import ratios as R
from neuroal.allocation.base import ALLOCATORS, Allocation, AllocationProblem, Allocator


@ALLOCATORS.register("uniform")
@dataclass(frozen=True)
class Uniform(Allocator):
    """The same sparsity for every prunable linear: `neuroal prune --top-up uniform --sparsity 0.5`."""

    supports_nm = True
    summary = "the same sparsity for every prunable linear"

    def allocate(self, problem: AllocationProblem, evidence=None) -> Allocation:
        return Allocation(R.uniform(problem.n_blocks, problem.linears, problem.sparsity))


@ALLOCATORS.register("dsnot")
@dataclass(frozen=True)
class DSnoTTopUp(Uniform):
    """Uniform ratios, masks refined by DSnoT's prune-and-grow (`neuroal.refiners.dsnot`).

    `neuroal prune --top-up dsnot --set dsnot_cycles=50 --set dsnot_threshold=0.1`
    """

    refiner = "dsnot"
    summary = "DSnoT: uniform sparsity, masks refined by prune-and-grow"
