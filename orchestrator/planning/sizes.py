"""Memory sizes and compute dtypes, as the planner's flags take them (``--gpu-mem``, ``--dtype``)."""

from __future__ import annotations

import logging
import math
import re

from neuroal.errors import SpecError

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

# A small parser rather than accelerate's `convert_file_size_to_int`: that one reads a lower-case
# "b" as bits ("80 gb" is 10 GB there), has no T/Ti units, no bare "24G" / "64k" / "4096" strings,
# and lets float() accept "1e9GB" or "nanGB"; normalising for it would be longer than this regex.
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int, *, field: str = "--gpu-mem") -> int:
    """Parse a memory size: ``80GB``, ``80GiB``, ``24G``, ``512MB``, ``1.5TB`` or a byte count.

    Decimal units (K, M, G, T, with or without ``B``) are powers of 10 and binary units (Ki, Mi,
    Gi, Ti) powers of 2, as accelerate's ``max_memory``. An "80GB" A100 has 80 GiB, so reading
    ``80GB`` as 80·10⁹ bytes errs on the safe side by 7%.

    >>> parse_bytes("80GB"), parse_bytes("80GiB"), parse_bytes("512MB"), parse_bytes(1024)
    (80000000000, 85899345920, 512000000, 1024)

    Args:
        text: the size as typed, or an int (bytes).
        field: the CLI field named in the error.

    Returns:
        The size in bytes (> 0).

    Raises:
        SpecError: empty, negative, zero or unknown unit.
    """
    allowed = "a positive size such as 80GB, 80GiB, 24G, 512MB or a byte count"
    if isinstance(text, bool):
        raise SpecError(field, text, allowed)
    if isinstance(text, int):
        if text <= 0:
            raise SpecError(field, text, allowed)
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise SpecError(field, text, allowed)
    number, unit = match.groups()
    value = int(float(number) * _UNITS[(unit or "").lower()])
    if value <= 0:
        raise SpecError(field, text, allowed)
    return value


def format_bytes(n: float, *, round_up: bool = False) -> str:
    """Human size in decimal units (``17.1 GB``), the unit `parse_bytes` reads back.

    >>> format_bytes(17_110_000_000), format_bytes(17_110_000_000, round_up=True), format_bytes(12)
    ('17.1 GB', '17.2 GB', '12 B')

    Args:
        n: bytes.
        round_up: round up to the shown precision (for stated minimums, so the shown value works).
    """
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= scale:
            value = math.ceil(n * 10 / scale) / 10 if round_up else n / scale
            return f"{value:.1f} {unit}"
    return f"{math.ceil(n) if round_up else int(n)} B"


def canonical_dtype(dtype: str) -> str:
    """The `DTYPE_BYTES` key for a dtype as typed (``bf16``, ``torch.float16``, ``fp32``, …).

    >>> canonical_dtype("bf16"), canonical_dtype("torch.float16"), DTYPE_BYTES[canonical_dtype("fp32")]
    ('bfloat16', 'float16', 4)

    Raises:
        SpecError: naming ``--dtype``, for anything but bfloat16, float16 or float32.
    """
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise SpecError("--dtype", dtype, sorted(DTYPE_BYTES))
    return key
