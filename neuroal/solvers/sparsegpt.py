"""SparseGPT (Frantar & Alistarh, 2023): mask selection and OBS update, one column at a time.

Follows IST-DASLab/sparsegpt `fasterprune`: column blocks of `blocksize`; in each block the
unstructured mask is chosen over the whole block by w² / [U]_jj² (adaptive mask selection) and
prunes `int(numel · sparsity)` + ties; N:M chooses per group of M columns. Per-row ratios (the
NeuroAL row step) are supported by choosing each row's count inside every block instead. Another
mask metric can replace w²/[U]_jj² (`saliency`, D²Prune's); the sweep and the update stay SparseGPT's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from neuroal.solvers.hessian import prepare

Saliency = Callable[[Tensor, Tensor, int], Tensor]


def _block_mask(W1: Tensor, d: Tensor, ratio: float | Tensor) -> Tensor:
    """Unstructured mask of one column block: True = prune."""
    return saliency_mask(W1**2 / d.reshape(1, -1) ** 2, ratio)  # [out, count]


def saliency_mask(tmp: Tensor, ratio: float | Tensor) -> Tensor:
    """Unstructured mask of one column block from its saliency tmp [out, count] (lowest pruned)."""
    if isinstance(ratio, Tensor):  # per-row ratio: each row's lowest floor(count · r) in this block
        k = (ratio.to(tmp.dtype) * tmp.shape[1]).floor().long().clamp(0, tmp.shape[1])
        rank = torch.argsort(torch.argsort(tmp, dim=1, stable=True), dim=1)
        return rank < k.reshape(-1, 1)
    thresh = torch.sort(tmp.flatten())[0][min(int(tmp.numel() * ratio), tmp.numel() - 1)]
    mask = tmp <= thresh
    if ratio <= 0:
        mask.zero_()
    return mask


@torch.no_grad()
def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float | Tensor,
    *,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    saliency: Saliency | None = None,
) -> Tensor:
    """Prune and reconstruct one linear layer.

    Args:
        W: [out, in] weights.
        H: [in, in] Hessian 2XᵀX/n of the layer inputs.
        sparsity: fraction to remove (float), or per-row fractions [out]; ignored for N:M.
        prunen, prunem: N:M pattern (prune N of every M consecutive inputs); 0 for unstructured.
        blocksize: columns per lazy-update block.
        percdamp: Hessian damping as a fraction of its mean diagonal.
        saliency: the mask metric, if not SparseGPT's w² / [U]_jj²: called as saliency(W1, d, j)
            with W1 [out, c] the current weights of c columns starting at column j, d [c] their
            [U]_jj; returns [out, c], lowest pruned (D²Prune's dual-Taylor metric).

    Returns:
        The new [out, in] weights in W's dtype, with exact zeros where pruned.
    """
    dtype = W.dtype
    W, U = prepare(W, H, percdamp)
    rows, cols = W.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        if prunen == 0:
            mask1 = _block_mask(W1, d1, sparsity) if saliency is None else saliency_mask(saliency(W1, d1, i1), sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = U1[i, i]
            if prunen != 0 and i % prunem == 0:
                if saliency is None:
                    tmp = W1[:, i : i + prunem] ** 2 / d1[i : i + prunem].reshape(1, -1) ** 2
                else:
                    tmp = saliency(W1[:, i : i + prunem], d1[i : i + prunem], i1 + i)
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(U1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
    return W.to(dtype)
