"""Ratios per block and linear: the common currency between allocators, the search and the shards.

`Ratios` maps block index -> linear name -> a float (one sparsity for the layer, row-mode mask) or a
numpy array [out] (per-row sparsities, NeuroAL's "neuron" mode: keep each row's top ⌊(1−s)·in⌋).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from neuroal.allocation.schedule import neuroal_row_sparsity
from neuroal.families import Family, row_groups

Ratio = float | np.ndarray
Ratios = dict[int, dict[str, Ratio]]


def uniform(n_blocks: int, linears: Sequence[str], sparsity: float) -> Ratios:
    return {b: {name: float(sparsity) for name in linears} for b in range(n_blocks)}


def per_block(block_sparsity: Sequence[float], linears: Sequence[str]) -> Ratios:
    return {b: {name: float(s) for name in linears} for b, s in enumerate(block_sparsity)}


def per_linear(values: Sequence[float], n_blocks: int, linears: Sequence[str]) -> Ratios:
    it = iter(values)
    return {b: {name: float(next(it)) for name in linears} for b in range(n_blocks)}


def neuroal_rows(
    family: Family,
    shapes: Mapping[str, tuple[int, int]],
    base: Ratios,
    alignment: Mapping[int, Mapping[str, Tensor]],
    lam: float,
) -> tuple[Ratios, list[str]]:
    """NeuroAL row step (reference `get_distribution_row`) for one λ.

    Each producer's rows get sparsities from its consumer's activation change r = a^d − a^s
    (measured at the best block λ). Every ratio is returned per row, including the uniform ones
    (last block, all-zero r, grouped-query q/k/v), because the reference prunes all of them in
    its per-row "neuron" mode.

    Returns:
        (ratios, notes): notes lists the producers kept at the block ratio by the width rule.
    """
    n_blocks = len(base)
    out: Ratios = {}
    kept_names: set[str] = set()
    for b in range(n_blocks):
        rows = {name: np.full(shapes[name][0], float(base[b][name])) for name in family.linears}
        if b < n_blocks - 1:
            groups, kept = row_groups(family, shapes, has_next=True)
            kept_names.update(kept)
            for consumer, producers in groups:
                if consumer.startswith("next:"):
                    r = alignment[b + 1][consumer[5:]]
                else:
                    r = alignment[b][consumer]
                r = r.detach().to(torch.float64).cpu().numpy()
                for p in producers:
                    rows[p] = neuroal_row_sparsity(r, float(base[b][p]), lam)
        out[b] = rows
    notes = [f"{p} keeps its block ratio (rows differ from the consumer's width)" for p in sorted(kept_names)]
    return out, notes


def mean_sparsity(ratios: Ratios, shapes: Mapping[str, tuple[int, int]]) -> float:
    """Parameter-weighted mean of the planned sparsity (per-row ratios averaged over rows)."""
    total = kept = 0.0
    for layer in ratios.values():
        for name, r in layer.items():
            out, inp = shapes[name]
            total += out * inp
            kept += float(np.mean(r)) * out * inp
    return kept / total


def to_tensor(r: Ratio) -> float | Tensor:
    """The form `prune_linear` takes: a float, or a float64 tensor of per-row ratios."""
    return torch.from_numpy(np.asarray(r, dtype=np.float64)) if isinstance(r, np.ndarray) else float(r)
