"""The prunable units of one block: its linears and, in a mixture of experts, each expert's matrix.

Allocators, masks and statistics see every unit alike: an `nn.Linear`, or an `ExpertMatrix` (one
slice of a fused [E, out, in] expert parameter, see `neuroal.families.Experts`).
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from neuroal.families import Experts, Family


class ExpertMatrix:
    """One expert's matrix inside a fused [E, out, in] parameter, seen as a linear.

    `.weight` is the [out, in] view ``param.data[index]``, read anew on each access: write through
    it (``unit.weight.data.copy_(W)``, ``unit.weight.copy_(W)``) or rebind the whole parameter
    (``unit.parameter.data = new``); rebinding ``unit.weight.data`` would change a temporary view
    only.
    """

    def __init__(self, experts: nn.Module, spec: Experts, param: str, index: int, moe: nn.Module):
        self.experts, self.spec, self.param, self.index, self.moe = experts, spec, param, index, moe

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.experts, self.param)

    @property
    def weight(self) -> Tensor:  # [out, in]
        return self.parameter.data[self.index]

    @property
    def out_features(self) -> int:
        return self.parameter.shape[1]

    @property
    def in_features(self) -> int:
        return self.parameter.shape[2]

    @property
    def is_gate_up(self) -> bool:
        return self.param == self.spec.gate_up

    def __repr__(self) -> str:
        return f"ExpertMatrix({self.spec.module}.{self.param}[{self.index}], {self.out_features}x{self.in_features})"


_UNIT = re.compile(r"(?P<module>.+)\.(?P<param>\w+)\[(?P<index>\d+)\]")


def block_linears(block: nn.Module, family: Family) -> dict[str, nn.Module | ExpertMatrix]:
    """The prunable units of one block, in forward order: its linears, then each expert's matrices.

    Plain linears are the block's own `nn.Linear` modules; an expert's matrix is an `ExpertMatrix`
    (a `.weight` [out, in] view, `out_features`, `in_features`).
    """
    out = {}
    for name in family.linears:
        unit = _UNIT.fullmatch(name) if family.experts is not None else None
        if unit is None:
            out[name] = block.get_submodule(name)
        else:
            out[name] = ExpertMatrix(block.get_submodule(unit["module"]), family.experts, unit["param"],
                                     int(unit["index"]), block.get_submodule(family.experts.moe))
    return out


def linear_shapes(block: nn.Module, family: Family) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each prunable linear of a block."""
    return {name: (lin.out_features, lin.in_features) for name, lin in block_linears(block, family).items()}
