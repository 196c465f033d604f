"""`--device auto` and `--dtype auto`: compute where the tensors can be, in that device's dtype.

Weights and hidden states take the compute dtype (bfloat16 on CUDA, float32 on CPU); statistics,
Hessians and solves keep their own named precision on any device (`neuroal.stats.STATS_DTYPE`,
`neuroal.solvers.hessian.SOLVE_DTYPE`).

>>> resolve_dtype("auto", torch.device("cpu")), resolve_dtype("bfloat16", torch.device("cpu"))
(torch.float32, torch.bfloat16)
"""

from __future__ import annotations

import logging

import torch

from neuroal.errors import SpecError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTO_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def resolve_device(device: str, *, gpu_given: bool = False) -> torch.device:
    """The torch device for `--device` ("auto": CUDA when this process sees a GPU, else CPU).

    Args:
        gpu_given: the scheduler assigned this process a GPU; without CUDA (a GPU declared to
            Ray for placement only) "auto" computes on CPU and says so.

    Raises:
        SpecError: `cuda` asked for where CUDA is not available.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if gpu_given:
            logger.warning("a GPU was assigned to this process but CUDA is not available: computing on CPU")
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device", device, "auto or cpu (CUDA is not available here)")
    return d


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `--dtype` on `device` ("auto": bfloat16 on CUDA, float32 elsewhere)."""
    if dtype == "auto":
        return AUTO_DTYPE.get(device.type, torch.float32)
    return getattr(torch, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
