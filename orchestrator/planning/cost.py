"""A projected wall time for an offloaded prune: FLOPs and block moves per pass, at stated rates.

A projection, not a measurement: every block's forward FLOPs (2·params·tokens + 4·S²·d per window
for attention) at a sustained device rate, plus each block's bytes moved to the device once per
block-major pass at a host→device (or disk) rate. Offloaded passes are block-major and one pass runs
at a time, so the shards of a chain take their turns one after another: the time is the sum over
all blocks whatever the number of actors. The rates are arguments: put in what
`benchmarks/gpu_check.py` measures on your GPU; the defaults are assumptions and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroal.allocation.schedule import block_lambdas, row_lambdas
from orchestrator.planning.layout import ModelLayout

ASSUMED_TFLOPS = 150.0  # bf16 sustained on an A100-80GB for these shapes (~48% of its 312 TFLOP/s peak)
ASSUMED_H2D_GBPS = 25.0  # pinned host memory over PCIe 4.0 x16
ASSUMED_DISK_GBPS = 2.0  # a local NVMe SSD read


def search_passes(sparsity: float) -> tuple[tuple[str, int], ...]:
    """λ candidates per block-major pass of a NeuroAL search, from its λ sets (block step 14, 13 at
    s ≥ 0.8; row step 15), and the tie check's re-scoring of the two best after each step."""
    return (("search: block step", len(block_lambdas(sparsity))), ("search: tie check", 2),
            ("search: row step", len(row_lambdas())), ("search: tie check", 2))


@dataclass(frozen=True)
class PassCost:
    name: str
    windows: int  # windows through each block in this pass, all streams together
    compute_s: float
    move_s: float

    @property
    def seconds(self) -> float:
        return self.compute_s + self.move_s


def block_forward_flops(params: int, hidden_size: int, seqlen: int) -> float:
    """Forward FLOPs of one window through one block: every weight once per token, plus attention."""
    return 2.0 * params * seqlen + 4.0 * seqlen * seqlen * hidden_size


def projected_passes(layout: ModelLayout, *, dtype_bytes: int, seqlen: int, search_windows: int, nsamples: int,
                     mode: str, tflops: float = ASSUMED_TFLOPS, h2d_gbps: float = ASSUMED_H2D_GBPS,
                     disk_gbps: float = ASSUMED_DISK_GBPS, row_step: bool = True,
                     sparsity: float = 0.5) -> list[PassCost]:
    """Per pass of a prune (the NeuroAL search's steps, then the final pass): compute and move seconds.

    Each window costs two forwards per block (dense for statistics, then the pruned block), in the
    search and in the final pass alike.
    """
    rate = min(h2d_gbps, disk_gbps) if mode == "disk" else h2d_gbps
    flops_per_window = sum(block_forward_flops(b.params, layout.hidden_size, seqlen) for b in layout.blocks)
    move_s = sum(b.params for b in layout.blocks) * dtype_bytes / (rate * 1e9)
    steps = search_passes(sparsity)
    if not row_step:  # solver methods (SparseGPT/APT/D²Prune): the block step only
        steps = steps[:2]
    passes = [(name, n * search_windows) for name, n in steps]
    passes.append(("final pass", nsamples))
    return [PassCost(name, w, 2 * w * flops_per_window / (tflops * 1e12), move_s) for name, w in passes]


def method_line(*, tflops: float, h2d_gbps: float, disk_gbps: float, mode: str) -> str:
    def said(value, default, unit):
        return f"{value:g} {unit}" + (" (assumed)" if value == default else " (given)")

    moves = said(h2d_gbps, ASSUMED_H2D_GBPS, "GB/s host->device")
    if mode == "disk":
        moves += ", " + said(disk_gbps, ASSUMED_DISK_GBPS, "GB/s disk")
    return (f"projection, not a measurement: dense block FLOPs at {said(tflops, ASSUMED_TFLOPS, 'TFLOP/s')} "
            f"(all experts counted for MoE: an upper bound) + each block moved once per pass at {moves}; "
            f"solver time (SparseGPT/APT/D²Prune) not counted")
