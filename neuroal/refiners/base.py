"""Mask refiners: a stage after the base method that changes which weights are pruned, not how many.

A refiner replaces `neuroal.methods.prune_linear` for every linear of the final pass (and of a
NeuroAL candidate, if both are asked for). It declares the statistics it needs, on top of the base
method's, and its knobs (constructor argument -> PruneSpec field), read at the config edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from neuroal.registry import Registry


class Refiner:
    needs: ClassVar[frozenset] = frozenset()
    knobs: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Refiner:
        return cls(**{arg: fields[name] for arg, name in cls.knobs.items() if name in fields})

    def prune(self, W: Tensor, stats, ratio, method, *, pattern=None, is_mlp: bool = False) -> Tensor:
        raise NotImplementedError


REFINERS: Registry[type[Refiner]] = Registry("refiner")
