"""An interrupted run's saved allocation, as JSON: nothing in a resume folder can execute code.

The resume folder may be an `s3://` prefix a team shares, so what is read back is data only:
numbers, strings and lists, with numpy arrays tagged by dtype and shape (`{"__ndarray__": ...}`),
which JSON round-trips exactly (a float's repr is exact). A file that is damaged, of another spec
or of another shape of model is ignored with a warning and the allocation is computed again; a
pickle left by an older version (`allocation.pt`) is never opened.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from neuroal import fileio
from neuroal.allocation import Allocation

logger = logging.getLogger(__name__)

ALLOCATION_FILE = "allocation.json"
LEGACY_PICKLE = "allocation.pt"
FORMAT = "neuroal-allocation/1"


def _encode(obj):
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": str(obj.dtype), "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    raise TypeError(f"not JSON data: {type(obj).__name__}")


def _decode(obj: dict):
    if "__ndarray__" not in obj:
        return obj
    dtype = np.dtype(obj["__ndarray__"])
    if dtype.kind not in "fiub":  # numbers only: never an object array
        raise ValueError(f"array of dtype {dtype}")
    return np.asarray(obj["data"], dtype=dtype).reshape(obj["shape"])


def allocation_json(alloc: Allocation, key: str) -> str:
    ratios = {str(b): r for b, r in alloc.ratios.items()}
    body = {**vars(alloc), "ratios": ratios}
    return json.dumps({"format": FORMAT, "cell_key": key, "allocation": body}, default=_encode)


def parse_allocation(text: str, key: str, n_blocks: int, linears) -> Allocation:
    """The allocation in `text`, checked against the spec's key and the model's blocks and linears.

    Raises:
        ValueError: the text is not this run's allocation.
    """
    doc = json.loads(text, object_hook=_decode)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("cell_key") != key:
        raise ValueError("not this run's allocation (format or spec key differ)")
    body = dict(doc["allocation"])
    ratios = {int(b): r for b, r in body.pop("ratios").items()}
    if sorted(ratios) != list(range(n_blocks)) or any(sorted(r) != sorted(linears) for r in ratios.values()):
        raise ValueError("its blocks or linears are not this model's")
    for r in ratios.values():
        for v in r.values():
            if not isinstance(v, (float, np.ndarray)) or not np.all((np.asarray(v) >= 0) & (np.asarray(v) <= 1)):
                raise ValueError("a ratio is not a number in [0, 1]")
    alloc = Allocation(ratios=ratios, **body)
    alloc.notes = list(alloc.notes) + ["allocation restored from an interrupted earlier attempt"]
    return alloc


def restore_allocation(resume_dir: str, key: str, n_blocks: int, linears) -> Allocation | None:
    """The allocation an interrupted attempt saved in `resume_dir`, or None (absent or not trusted)."""
    if fileio.exists(fileio.join(resume_dir, LEGACY_PICKLE)):
        logger.warning("%s: ignoring %s (a pickle, never loaded); the allocation is computed again",
                       resume_dir, LEGACY_PICKLE)
    path = fileio.join(resume_dir, ALLOCATION_FILE)
    if not fileio.exists(path):
        return None
    try:
        return parse_allocation(fileio.read_text(path), key, n_blocks, linears)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # json.JSONDecodeError is a ValueError
        logger.warning("%s: ignoring %s (%s); the allocation is computed again", resume_dir, ALLOCATION_FILE, exc)
        return None


def save_allocation(resume_dir: str, alloc: Allocation, key: str) -> None:
    fileio.write_text(fileio.join(resume_dir, ALLOCATION_FILE), allocation_json(alloc, key))
