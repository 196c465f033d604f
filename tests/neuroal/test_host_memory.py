"""Freed host memory is kept: a buffer freed and allocated again is not page-faulted in again."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

_PROBE = """
import resource, sys
import torch
from neuroal.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else False
torch.set_num_threads(1)
for _ in range(20):  # warm-up: glibc's heap settles (posix_memalign's slack leaves freed chunks too small at first)
    torch.empty(25_000_000).fill_(1.0)  # 100 MB: above glibc's largest dynamic mmap threshold (32 MiB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(25_000_000).fill_(1.0)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_a_freed_buffer_is_reused_not_refaulted():
    # glibc's defaults: each 100 MB buffer is a fresh mmap, 24,414 pages faulted in every time;
    # with the thresholds raised the freed heap chunks are reused: no page faults at all
    kept, with_keep = _faults("keep")
    _, default = _faults("default")
    assert kept == "True"
    assert default > 10 * 24_000
    assert with_keep < 1_000


def test_the_environment_keeps_glibc_defaults():
    kept, faults = _faults("keep", NEUROAL_KEEP_FREED_MEMORY="0")
    assert kept == "False" and faults > 10 * 24_000
