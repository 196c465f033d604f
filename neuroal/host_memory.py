"""Freed host memory stays with the process, so a pass's buffers are reused instead of refaulted.

glibc serves an allocation above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB)
with a fresh mmap, unmaps it on free, and trims the heap's top beyond its trim threshold. A CPU
forward pass frees and re-allocates the same large buffers every batch (each block's activations,
the head's [positions, vocab] logits), so every batch page-faults its working set in again, and a
page fault costs more in a Ray worker than in a plain process (measured: 100 MB of fresh pages
filled in 80 ms in a shard actor, 22 ms in the driver). Raising both thresholds keeps freed memory for reuse,
as the jemalloc/tcmalloc settings recommended for PyTorch CPU inference do: perplexity through one
Ray shard actor went from 0.42 to 0.35 s/window (benchmarks/eval_speed.py, one sitting). The cost is that the
process keeps its peak heap instead of returning it between batches; `NEUROAL_KEEP_FREED_MEMORY=0`
keeps glibc's defaults (it must be set before the shard processes start).
"""

from __future__ import annotations

import ctypes
import os
import platform

KEEP_BYTES = 1 << 30  # allocations below this come from the heap; a freed heap top below this is kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
ENV = "NEUROAL_KEEP_FREED_MEMORY"
_kept = False


def keep_freed_host_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds for this process to `keep_bytes` (once).

    Returns whether they are raised: False where libc is not glibc or `NEUROAL_KEEP_FREED_MEMORY=0`.
    """
    global _kept
    if _kept:
        return True
    if os.environ.get(ENV, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _kept = libc.mallopt(_M_MMAP_THRESHOLD, keep_bytes) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes) == 1
    return _kept
