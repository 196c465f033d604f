"""Base pruning methods by name, and pruning one linear at given ratios.

A method is either score-based (magnitude, Wanda, multiflow: a score, then a mask) or a solver
(SparseGPT, APT: mask selection plus weight reconstruction from the Hessian). `prune_linear` is the
one place where a ratio (a float, or a per-row tensor from the NeuroAL row step) or an N:M pattern
becomes new weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from neuroal import masks
from neuroal.errors import SpecError
from neuroal.registry import Registry
from neuroal.scores import SCORES, ScoreFn
from neuroal.stats import HESSIAN, NORMS, LinearStats

SolverFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset  # statistics kinds it needs from the calibration pass
    score: ScoreFn | None = None
    solver: SolverFn | None = None


def _sparsegpt(*args, **kwargs):
    from neuroal.solvers.sparsegpt import sparsegpt_prune

    return sparsegpt_prune(*args, **kwargs)


def _apt(*args, **kwargs):
    from neuroal.solvers.apt import apt_prune

    return apt_prune(*args, **kwargs)


METHODS: Registry[Method] = Registry("--method", group="neuroal.methods", adapt="neuroal.plugins:as_method",
                                     plugins="a Method or a score function (W, stats) -> scores")
METHODS.register("magnitude")(Method("magnitude", frozenset(), score=SCORES.get("magnitude")))
METHODS.register("wanda")(Method("wanda", frozenset({NORMS}), score=SCORES.get("wanda")))
METHODS.register("sparsegpt")(Method("sparsegpt", frozenset({HESSIAN}), solver=_sparsegpt))
METHODS.register("multiflow")(Method("multiflow", frozenset({NORMS}), score=SCORES.get("multiflow")))
METHODS.register("apt")(Method("apt", frozenset({HESSIAN}), solver=_apt))


@dataclass(frozen=True)
class Pattern:
    """An N:M semi-structured pattern: N of every M consecutive inputs are pruned."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


PATTERNS = ("unstructured", "2:4", "4:8")


def parse_pattern(text: str) -> Pattern | None:
    """'unstructured' -> None; 'N:M' with 0 < N < M -> Pattern.

    Raises:
        SpecError: naming `--pattern` and the allowed values.
    """
    if text in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise SpecError("--pattern", text, "unstructured, N:M with 0 < N < M (e.g. 2:4, 4:8)") from None
    if not 0 < n < m:
        raise SpecError("--pattern", text, "unstructured, N:M with 0 < N < M (e.g. 2:4, 4:8)")
    return Pattern(n, m)


@torch.no_grad()
def prune_linear(
    W: Tensor,
    stats: LinearStats | None,
    ratio: float | Tensor,
    method: Method,
    *,
    pattern: Pattern | None = None,
    granularity: str = "row",
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tensor:
    """New weights for one linear: W [out, in] pruned at `ratio` (or `pattern`) by `method`.

    Args:
        ratio: the layer's sparsity, or a [out] tensor of per-row sparsities.
        granularity: "row" (per output row, default) or "layer" (one threshold) for score methods.

    Returns:
        [out, in] weights in W's dtype with exact zeros where pruned.
    """
    if method.solver is not None:
        n, m = (pattern.n, pattern.m) if pattern else (0, 0)
        return method.solver(W, stats.hessian, ratio, prunen=n, prunem=m, blocksize=blocksize, percdamp=percdamp)
    score = method.score(W, stats)
    if pattern is not None:
        mask = masks.nm_mask(score, pattern.n, pattern.m)
    elif isinstance(ratio, Tensor):
        mask = masks.row_mask_ratios(score, ratio)
    elif granularity == "layer":
        mask = masks.layer_mask(score, ratio)
    else:
        mask = masks.row_mask(score, ratio)
    return W.masked_fill(mask, 0)
