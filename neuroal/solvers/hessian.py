"""Hessian preparation shared by the OBS-style solvers (SparseGPT, APT).

H = 2 XᵀX / n over the calibration inputs of one linear (accumulated as a running mean by
`neuroal.stats`). Dead input channels (zero diagonal) are set to 1 and their weights to 0, damping
adds `percdamp · mean(diag H)` to the diagonal, and the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU)
is what both solvers sweep with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuroal.errors import SingularHessianError

SOLVE_DTYPE = torch.float32


def damped(H: Tensor, percdamp: float, dtype: torch.dtype = SOLVE_DTYPE) -> tuple[Tensor, Tensor]:
    """(H with dead channels set to 1 and percdamp · mean(diag) added to the diagonal, dead [in] mask)."""
    H = H.to(dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    return H, dead


def prepare(W: Tensor, H: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Return (W with dead columns zeroed, U) with U the upper Cholesky factor of (H + damp·I)⁻¹.

    Args:
        W: [out, in] weights (copied, cast to fp32).
        H: [in, in] Hessian (not modified).
        percdamp: damping as a fraction of the mean diagonal.

    Raises:
        SingularHessianError: H is not positive definite even after damping.
    """
    W = W.to(SOLVE_DTYPE).clone()
    H, dead = damped(H, percdamp)
    W[:, dead] = 0
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise SingularHessianError(
            f"Hessian of a {tuple(W.shape)} layer is not positive definite after damping {percdamp}; "
            "raise percdamp or use more calibration data"
        )
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0 or not torch.isfinite(U).all():
        raise SingularHessianError(
            f"inverse Hessian of a {tuple(W.shape)} layer is ill-conditioned; raise percdamp"
        )
    return W, U
