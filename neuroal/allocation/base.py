"""The allocator plug-in point: a top-up declares the evidence it needs and turns it into ratios.

Evidence kinds, each collected by one generic collector in the orchestrator (never by top-up name):

- `Evidence.NOTHING`: the model's shapes only (uniform).
- `Evidence.BLOCK_STATS`: one dense calibration pass; every block is summarised by the allocator's
  `block_summary(weights, stats)` where the block lives, and the summaries come back in block order
  (OWL's outlier ratio).
- `Evidence.WEIGHTS`: every prunable weight matrix summarised by `weight_summary(W)` where it
  lives, no data (AlphaPruning's ESD exponent).
- `Evidence.ALIGNMENT`: a `CandidateScorer` that streams candidate allocations through the model
  and returns their alignment scores (NeuroAL's search).

Adding a top-up is one module with an `Allocator` subclass registered in `ALLOCATORS`, plus tests; one
in the user's own installed package is named `--top-up package.module:Class` (`neuroal.plugins`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from torch import Tensor

from neuroal.allocation.ratios import Ratios
from neuroal.errors import SpecError
from neuroal.families import Family
from neuroal.methods import Method
from neuroal.registry import Registry


class Evidence(enum.Enum):
    NOTHING = "nothing"
    BLOCK_STATS = "block statistics"
    WEIGHTS = "weights"
    ALIGNMENT = "candidate alignment scores"


@dataclass(frozen=True)
class AllocationProblem:
    """What every allocator may know about the model and the target."""

    n_blocks: int
    linears: tuple[str, ...]
    shapes: Mapping[str, tuple[int, int]]  # (out, in) per linear name (blocks of a model share them)
    sparsity: float
    family: Family
    method: Method


@dataclass
class Allocation:
    """Per-block, per-linear (or per-row) ratios and what the allocator wants recorded in run.json."""

    ratios: Ratios
    lambda_block: float | None = None
    lambda_row: float | None = None
    curves: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    step_run: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's alignment score: `total` is None when it was stopped early (it cannot win).

    `alignment` (block -> linear -> a^d − a^s [in]) is filled for finished candidates when asked.
    """

    total: float | None
    partial: float
    alignment: dict[int, dict[str, np.ndarray]] | None = None


class CandidateScorer(Protocol):
    """Scores candidate allocations (keyed, e.g. by λ) on the model; provided by the orchestrator."""

    def __call__(
        self, step: str, candidates: Mapping[Any, Ratios], *, first: Any, want_alignment: bool, reverse: bool = False
    ) -> dict[Any, CandidateScore]:
        """Scores of the candidates; `reverse`: the search windows in reverse order, every one to the end."""


class Allocator:
    """Base of the registered top-ups. Subclasses are frozen dataclasses whose fields are their knobs.

    Class attributes:
        evidence: the kind of evidence `allocate` receives.
        supports_nm: whether it may run with an N:M pattern (which fixes every layer at N/M).
        refiner: name of a mask refiner (`neuroal.refiners.REFINERS`) the final pass applies.
        stats_kinds: statistics the dense pass keeps for `block_summary` (BLOCK_STATS).
        knobs: constructor argument -> PruneSpec field, read by `from_fields` at the config edge.
        summary: one line for `--help` and the README.
    """

    evidence: ClassVar[Evidence] = Evidence.NOTHING
    supports_nm: ClassVar[bool] = False
    refiner: ClassVar[str | None] = None
    stats_kinds: ClassVar[frozenset] = frozenset()
    knobs: ClassVar[Mapping[str, str]] = {}
    summary: ClassVar[str] = ""

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Allocator:
        """The allocator with its knobs read from spec fields (missing ones keep their defaults)."""
        return cls(**{arg: fields[name] for arg, name in cls.knobs.items() if name in fields})

    @classmethod
    def check(cls, fields: Mapping[str, Any], explicit: set[str]) -> None:
        """Raise `SpecError` for spec combinations this allocator refuses (`explicit`: fields the user set)."""

    @property
    def evidence_windows(self) -> int | None:
        """Calibration windows its evidence needs (None: all of them)."""
        return None

    def block_summary(self, weights: Mapping[str, Tensor], stats: Mapping) -> Any:
        raise NotImplementedError(f"{type(self).__name__} declares no block summary")

    def weight_summary(self, W: Tensor) -> float:
        raise NotImplementedError(f"{type(self).__name__} declares no weight summary")

    def allocate(self, problem: AllocationProblem, evidence) -> Allocation:
        raise NotImplementedError


ALLOCATORS: Registry[type[Allocator]] = Registry("--top-up", group="neuroal.top_ups",
                                                adapt="neuroal.plugins:as_allocator",
                                                plugins="an Allocator subclass or instance")


def supports_nm_names() -> list[str]:
    return [n for n in ALLOCATORS.names() if ALLOCATORS.get(n).supports_nm]


def check_nm(name: str) -> None:
    """An N:M pattern fixes every layer's sparsity: only allocators that keep it uniform apply."""
    if not ALLOCATORS.get(name).supports_nm:
        raise SpecError("--top-up", name, f"{', '.join(supports_nm_names())} with an N:M --pattern (it fixes every layer at N/M)")
