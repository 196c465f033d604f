"""Ratios per block and linear: the common currency between allocators, the search and the shards.

`Ratios` maps block index -> linear name -> a float (one sparsity for the layer, row-mode mask) or a
numpy array [out] (per-row sparsities, NeuroAL's "neuron" mode: keep each row's top ⌊(1−s)·in⌋).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Ratio = float | np.ndarray
Ratios = dict[int, dict[str, Ratio]]


def uniform(n_blocks: int, linears: Sequence[str], sparsity: float) -> Ratios:
    return {b: {name: float(sparsity) for name in linears} for b in range(n_blocks)}


def per_block(block_sparsity: Sequence[float], linears: Sequence[str]) -> Ratios:
    return {b: {name: float(s) for name in linears} for b, s in enumerate(block_sparsity)}


def per_linear(values: Sequence[float], n_blocks: int, linears: Sequence[str]) -> Ratios:
    it = iter(values)
    return {b: {name: float(next(it)) for name in linears} for b in range(n_blocks)}


def to_tensor(r: Ratio) -> float | Tensor:
    """The form `prune_linear` takes: a float, or a float64 tensor of per-row ratios."""
    return torch.from_numpy(np.asarray(r, dtype=np.float64)) if isinstance(r, np.ndarray) else float(r)
