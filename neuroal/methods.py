"""Base pruning methods by name, and pruning one linear at given ratios.

A method is either score-based (magnitude, Wanda, multiflow, RIA: a score, then a mask) or a solver
(SparseGPT, APT, D²Prune: mask selection plus weight reconstruction from the Hessian). Each is
registered once, here, in `METHODS` (the CLI's `--method` choices, in this order);
`neuroal.scores.SCORES` is the view of the score-based ones. `prune_linear` is the one place where a
ratio (a float, or a per-row tensor from the NeuroAL row step) or an N:M pattern becomes new weights.

A solver is called as ``solver(W, stats, ratio, prunen=, prunem=, blocksize=, percdamp=, linear=)``
with the linear's `LinearStats` and its name in the block (D²Prune treats some q/k/v by name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from neuroal import masks
from neuroal import scores as S
from neuroal.errors import SpecError
from neuroal.registry import Registry
from neuroal.scores import ScoreFn
from neuroal.stats import D2_NORMS, HESSIAN, NORMS, LinearStats

SolverFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Method:
    """A base method.

    Attributes:
        name: its `--method` name.
        needs: statistics kinds it needs from the calibration pass (`neuroal.stats`).
        score: score-based methods: (W, stats) -> [out, in] importance, higher kept.
        solver: solver methods: see the module doc.
        saliency: solver methods, optional: (W, stats) -> [out, in] mask metric on the dense
            weights, lowest pruned, for a refiner's initial mask (DSnoT); None: SparseGPT's.
    """

    name: str
    needs: frozenset
    score: ScoreFn | None = None
    solver: SolverFn | None = None
    saliency: Callable[[Tensor, LinearStats], Tensor] | None = None


def _sparsegpt(W, stats, ratio, *, linear="", **kw):
    from neuroal.solvers.sparsegpt import sparsegpt_prune

    return sparsegpt_prune(W, stats.hessian, ratio, **kw)


def _apt(W, stats, ratio, *, linear="", **kw):
    from neuroal.solvers.apt import apt_prune

    return apt_prune(W, stats.hessian, ratio, **kw)


def _d2prune(W, stats, ratio, **kw):
    from neuroal.solvers.d2prune import d2prune

    return d2prune(W, stats, ratio, **kw)


def _d2_saliency(W, stats):
    from neuroal.solvers.d2prune import d2_initial_metric

    return d2_initial_metric(W, stats)


METHODS: Registry[Method] = Registry("--method", group="neuroal.methods", adapt="neuroal.plugins:as_method",
                                     plugins="a Method or a score function (W, stats) -> scores")


def register(method: Method, *aliases: str) -> Method:
    """Add a method under its name (a score method also shows in `neuroal.scores.SCORES`)."""
    return METHODS.register(method.name, *aliases)(method)


register(Method("magnitude", frozenset(), score=S.magnitude))
register(Method("wanda", frozenset({NORMS}), score=S.wanda))
register(Method("sparsegpt", frozenset({HESSIAN}), solver=_sparsegpt))
register(Method("multiflow", frozenset({NORMS}), score=S.multiflow))
register(Method("apt", frozenset({HESSIAN}), solver=_apt))
register(Method("ria", frozenset({NORMS}), score=S.ria))
register(Method("d2prune", frozenset({HESSIAN, NORMS, D2_NORMS}), solver=_d2prune, saliency=_d2_saliency))


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
    linear: str = "",
) -> Tensor:
    """New weights for one linear: W [out, in] pruned at `ratio` (or `pattern`) by `method`.

    Args:
        ratio: the layer's sparsity, or a [out] tensor of per-row sparsities.
        granularity: "row" (per output row, default) or "layer" (one threshold) for score methods.
        linear: the linear's name in its block (solvers may treat some by name).

    Returns:
        [out, in] weights in W's dtype with exact zeros where pruned.
    """
    if method.solver is not None:
        n, m = (pattern.n, pattern.m) if pattern else (0, 0)
        return method.solver(W, stats, ratio, prunen=n, prunem=m, blocksize=blocksize, percdamp=percdamp,
                             linear=linear)
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
