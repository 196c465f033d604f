"""Offloaded shards: blocks that do not fit the device wait on the host or on local disk.

A shard whose blocks exceed its device budget keeps them parked between their turns:

- `cpu`: in host memory (pinned when the device is a GPU, so the copy overlaps compute); the
  module's parameters point at the host copies while parked, so everything that reads weights
  (save, checkpoints, masks) reads them there;
- `disk`: as one safetensors file per block on local disk (memory-mapped when read back).

`on_device(b)` moves block b to the device for its turn and parks it again afterwards, writing its
(pruned) weights back when the pass changed them. Every move is counted per pass kind, and the
resident bytes (the shard's non-block tensors plus the block on the device) are tracked, so run.json
can show that each block moved once per pass and that the budget held. Block-major passes
(`Shard.run_many`: every stream through block b before block b+1) make it once per pass.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from orchestrator.planning.offloaded import OFFLOAD_MODES

logger = logging.getLogger(__name__)

MODES = ("none", *OFFLOAD_MODES)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class BlockResidency:
    """Where an offloaded shard's blocks are, and how often each went to the device."""

    def __init__(self, blocks: dict[int, nn.Module], device: torch.device, mode: str, *, persistent_bytes: int,
                 budget: int | None = None, local_dir: str | Path | None = None):
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload mode: got {mode!r}; allowed: {', '.join(OFFLOAD_MODES)}")
        self.blocks, self.device, self.mode, self.budget = blocks, device, mode, budget
        self.persistent_bytes = persistent_bytes
        self.moves: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.resident_bytes = self.peak_resident_bytes = persistent_bytes
        self.current = None
        self._tmp = tempfile.TemporaryDirectory(prefix="neuroal-offload-", dir=local_dir) if mode == "disk" else None
        self.block_bytes = {b: sum(_nbytes(p) for p in blk.parameters()) for b, blk in blocks.items()}
        pin = device.type == "cuda"
        for b, block in blocks.items():
            for p in block.parameters():
                host = p.data.to("cpu")
                p.data = host.pin_memory() if pin else host
            if mode == "disk":
                self._park_to_disk(b)

    # ---------------------------------------------------------------- disk

    def _file(self, b: int) -> Path:
        return Path(self._tmp.name) / f"block-{b:05d}.safetensors"

    def _park_to_disk(self, b: int) -> None:
        params = dict(self.blocks[b].named_parameters())
        save_file({n: p.data.contiguous() for n, p in params.items()}, str(self._file(b)))
        for p in params.values():
            p.data = torch.empty(0, dtype=p.dtype)

    def _from_disk(self, b: int, device) -> None:
        params = dict(self.blocks[b].named_parameters())
        with safe_open(self._file(b), "pt", device=str(device)) as f:
            for n, p in params.items():
                p.data = f.get_tensor(n)

    # ---------------------------------------------------------------- turns

    @contextlib.contextmanager
    def on_device(self, b: int, *, kind: str, write_back: bool) -> Iterator[None]:
        """Block b on the device for one pass of `kind`; parked again (and written back) afterwards."""
        assert self.current is None, "one block at a time"
        self.current = b
        self.moves[kind][b] += 1
        self.resident_bytes = self.persistent_bytes + self.block_bytes[b]
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        params = list(self.blocks[b].parameters())
        if self.mode == "disk":
            self._from_disk(b, self.device)
            host = None
        else:
            host = [p.data for p in params]
            for p in params:
                p.data = p.data.to(self.device, non_blocking=True)
        try:
            yield
        finally:
            if self.mode == "disk":
                if write_back:
                    save_file({n: p.data.detach().to("cpu").contiguous()
                               for n, p in self.blocks[b].named_parameters()}, str(self._file(b)))
                for p in params:
                    p.data = torch.empty(0, dtype=p.dtype)
            else:
                for p, h in zip(params, host):
                    if write_back and p.data.data_ptr() != h.data_ptr():
                        h.copy_(p.data)
                    p.data = h
            self.current = None
            self.resident_bytes = self.persistent_bytes

    def report(self) -> dict:
        return {"mode": self.mode, "budget_bytes": self.budget, "peak_resident_bytes": self.peak_resident_bytes,
                "moves": {kind: dict(sorted(per.items())) for kind, per in self.moves.items()}}
