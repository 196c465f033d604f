"""What crosses a process boundary: host data only (DESIGN §8), converted in this one module.

- Hidden states between shards travel as ("wire" form) a numpy array on the host plus its dtype
  name: the object store keeps numpy zero-copy, bfloat16 goes as int16 bits, and in-process the
  conversion shares memory.
- Everything an actor returns to the driver is host data: numpy arrays, Python scalars, or
  dataclasses, dicts, lists and tuples of those (`to_host`). A CUDA tensor would fail to unpickle
  on a CPU-only head; a CPU tensor would tie the driver to torch's pickling. `find_tensors` checks.

>>> import torch
>>> to_host({"a": torch.ones(2), "b": [torch.tensor(3.0), 1.5]})
{'a': array([1., 1.], dtype=float32), 'b': [array(3., dtype=float32), 1.5]}
>>> t = from_wire(to_wire(torch.ones(2, dtype=torch.bfloat16)), "cpu")
>>> t.dtype, t.tolist()
(torch.bfloat16, [1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import Tensor

_WIRE_VIEW = {torch.bfloat16: torch.int16}


def to_wire(t: Tensor) -> tuple[np.ndarray, str]:
    """A tensor on any device as (host numpy array, dtype name)."""
    t = t.detach().to("cpu")
    dtype = str(t.dtype).removeprefix("torch.")
    if t.dtype in _WIRE_VIEW:
        t = t.view(_WIRE_VIEW[t.dtype])
    return t.numpy(), dtype


def from_wire(wire: tuple[np.ndarray, str], device) -> Tensor:
    """The tensor back, on `device` (where it is used)."""
    arr, dtype = wire
    with warnings.catch_warnings():  # object-store arrays are read-only; blocks never write inputs
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.asarray(arr))
    target = getattr(torch, dtype)
    if target in _WIRE_VIEW:
        t = t.view(target)
    return t.to(device)


def to_host(obj):
    """`obj` with every tensor (on any device) replaced by a numpy array, recursively."""
    if isinstance(obj, Tensor):
        t = obj.detach().to("cpu")
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_host(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def find_tensors(obj, path: str = "result") -> list[str]:
    """Paths of the torch tensors inside `obj` (empty when it is host data)."""
    if isinstance(obj, Tensor):
        return [path]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [p for f in dataclasses.fields(obj) for p in find_tensors(getattr(obj, f.name), f"{path}.{f.name}")]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in find_tensors(v, f"{path}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in find_tensors(v, f"{path}[{i}]")]
    return []


@dataclasses.dataclass(frozen=True)
class Packed:
    """A tensor in wire form inside a packed structure (kept apart from user tuples)."""

    array: np.ndarray
    dtype: str


def pack(obj, _memo: dict | None = None):
    """`obj` with every tensor replaced by a `Packed` host array, reversibly (`unpack`).

    The same tensor packs to the same object, so a structure that shares tensors (one mask for
    every layer) pickles them once.
    """
    memo = {} if _memo is None else _memo
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = Packed(*to_wire(obj))
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: pack(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack(v, memo) for v in obj)
    return obj


def unpack(obj, device, _memo: dict | None = None):
    """The structure `pack` made, with its tensors back on `device`."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, Packed):
        if id(obj) not in memo:
            memo[id(obj)] = from_wire((obj.array, obj.dtype), device)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: unpack(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack(v, device, memo) for v in obj)
    return obj
