"""Block- and row-wise sparsity schedules of OWL and NeuroAL (reference: eliacunegatti/NeuroAL).

Both map a score per unit (block or row) to a sparsity window around the target:
g = minmax(v) · 2λ, g ← g − mean(g) + (1 − s), sparsity = 1 − g. So the mean density is kept and
the spread is 2λ. Units with a larger score keep more weights.

Clipping follows the reference exactly: the block schedules (`get_distribution_block`,
`get_sparsity_owl`) map values ≤ 0 to 0.01 and ≥ 1 to 0.99 (values in (0, 0.01) stay); the row
schedule (`get_distribution_row`) clips to [0.01, 0.99] with `np.clip`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NEUROAL_BLOCK_LAMBDAS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.15, 0.20, 0.25)


def block_lambdas(sparsity: float) -> tuple[float, ...]:
    """NeuroAL's block-step λ set; 0.25 is dropped when s ≥ 0.8 (it would push blocks past 1)."""
    return NEUROAL_BLOCK_LAMBDAS if sparsity < 0.8 else NEUROAL_BLOCK_LAMBDAS[:-1]


def row_lambdas() -> tuple[float, ...]:
    """NeuroAL's row-step λ set: {0.00} ∪ the full block set (the reference keeps 0.25 at any s)."""
    return (0.0,) + NEUROAL_BLOCK_LAMBDAS


def _spread(values: Sequence[float], sparsity: float, lam: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    if span == 0:  # all equal (or λ irrelevant): the reference would divide by zero; stay uniform
        g = np.zeros_like(v)
    else:
        g = (v - v.min()) * (1 / span * lam * 2)
    return g - np.mean(g) + (1 - sparsity)


def _clip_block(s: np.ndarray) -> np.ndarray:
    s = s.copy()
    s[s <= 0] = 0.01
    s[s >= 1] = 0.99
    return s


def neuroal_block_sparsity(n_blocks: int, sparsity: float, lam: float) -> np.ndarray:
    """NeuroAL block step: a linear ramp 1..L → [s − λ, s + λ], sparsity rising with depth.

    >>> neuroal_block_sparsity(3, 0.5, 0.1).round(6).tolist()
    [0.4, 0.5, 0.6]
    """
    g = _spread(np.arange(1, n_blocks + 1), sparsity, lam)
    return _clip_block(1 - np.sort(g)[::-1])


def owl_block_sparsity(outlier_ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> np.ndarray:
    """OWL: blocks with a larger outlier ratio D keep more weights (no sort)."""
    return _clip_block(1 - _spread(outlier_ratios, sparsity, lam))


def neuroal_row_sparsity(r, base: float, lam: float) -> np.ndarray:
    """NeuroAL row step for one producer: r [rows] is its consumer's a^d − a^s mapped to its rows.

    Rows whose consumer channel lost more activation (larger r) keep more weights. All-zero r
    (`sum == 0`, the reference test) keeps the base ratio on every row.
    """
    r = np.asarray(r, dtype=np.float64)
    if r.sum() == 0 or r.max() == r.min():
        return np.full(r.shape, base, dtype=np.float64)
    g = (r - r.min()) / (r.max() - r.min()) * lam * 2
    g -= np.mean(g) - (1 - base)
    return np.clip(1 - g, 0.01, 0.99)
