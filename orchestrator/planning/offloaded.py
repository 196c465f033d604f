"""Plans for fewer accelerators than the model needs: shards whose blocks take turns on the device.

An offloaded shard (`orchestrator.chain.offload`) keeps its decoder blocks in host memory (pinned) or on
local disk and moves one block at a time to the device; passes run block-major (`Shard.run_many`),
so every stream of a pass goes through block b before block b+1 and each block moves once per pass.
What the device must hold is then one block, not the shard: the embeddings / head the shard carries,
its largest block, that block's working set, and the hidden states of every stream of the pass.

>>> from transformers import LlamaConfig
>>> cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
...                   num_attention_heads=4, num_key_value_heads=2)
>>> p = plan_offloaded(cfg, n_actors=1, mem_per_actor=10**7, seqlen=16, mode="cpu")
>>> p.shards[0].host_bytes == p.plan.shards[0].block_param_bytes, p.shards[0].disk_bytes
(True, 0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from neuroal.errors import SpecError
from orchestrator.planning.layout import measure_model
from orchestrator.planning.memory import estimate_activation
from orchestrator.planning.partition import default_micro_tokens, needs_hessian, plan_shards
from orchestrator.planning.shards import Plan
from orchestrator.planning.sizes import DTYPE_BYTES, canonical_dtype, format_bytes, parse_bytes

OFFLOAD_MODES = ("cpu", "disk")
# streams of the largest block-major pass of a NeuroAL search: the row step's 15 λ candidates
SEARCH_STREAMS = 15

T = TypeVar("T")


def resident_or_offloaded(offload: str, resident: Callable[[], T], budget: str) -> tuple[T | None, str | None, str]:
    """`--offload`'s one rule (prune, eval and plan): "cpu"/"disk" offload in any case; "none" and
    "auto" take the resident plan (`resident()`, which raises SpecError when the blocks do not fit
    `budget`), and "auto" falls back to host memory when it does not fit.

    Returns:
        (the resident plan or None, the offload mode or None, why it is offloaded, in words).

    >>> resident_or_offloaded("auto", lambda: "plan", "--gpu-mem 80GB")
    ('plan', None, '')
    >>> resident_or_offloaded("disk", lambda: "plan", "--gpu-mem 80GB")
    (None, 'disk', '--offload disk')
    >>> def too_big(): raise SpecError("--shards", 1, "more")
    >>> print(*resident_or_offloaded("auto", too_big, "--gpu-mem 1GB")[1:])
    cpu the blocks do not fit --gpu-mem 1GB (--shards: got 1; allowed: more): offloaded to host memory, one block at a time
    """
    if offload in OFFLOAD_MODES:
        return None, offload, f"--offload {offload}"
    try:
        return resident(), None, ""
    except SpecError as exc:
        if offload != "auto":
            raise
        return None, "cpu", f"the blocks do not fit {budget} ({exc}): offloaded to host memory, one block at a time"


@dataclass(frozen=True)
class OffloadedShard:
    """Where one offloaded actor's bytes are.

    Attributes:
        device_bytes: on its accelerator: the embeddings / head it carries, its largest block,
            and the activations of the largest pass (`estimate_activation` with every stream of
            the pass resident, plus the stream outputs).
        host_bytes: in host memory: every block's weights (`cpu`), or one block read back from
            disk (`disk`).
        disk_bytes: on local disk: every block's weights (`disk`), else 0.
    """

    device_bytes: int
    host_bytes: int
    disk_bytes: int


@dataclass(frozen=True)
class OffloadPlan:
    """A plan whose shards are offloaded: the ranges (`plan`) and each actor's device/host/disk need."""

    plan: Plan
    mode: str
    shards: tuple[OffloadedShard, ...]
    nsamples: int
    reason: str = ""

    @property
    def max_device_bytes(self) -> int:
        return max(s.device_bytes for s in self.shards)

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "offload": self.mode, "offload_reason": self.reason, "nsamples": self.nsamples,
                "offloaded_shards": [vars(s) for s in self.shards]}


def plan_offloaded(config, *, n_actors: int | None = None, mem_per_actor, mode: str = "cpu", dtype: str = "bfloat16",
                   stream_windows: int = 8, nsamples: int = 128, seqlen: int = 2048, method: str = "wanda",
                   headroom: float = 0.1, reason: str = "") -> OffloadPlan:
    """Offloaded shards: blocks balanced by bytes over `n_actors` (default 1), one block at a time on a device.

    The device need of a shard is that of its largest block in the larger of two passes: the
    search's block-major step (`SEARCH_STREAMS` candidates of `stream_windows` windows, all
    resident) and the final pass (one stream of `nsamples` windows, input and output resident).

    Raises:
        SpecError: a bad mode, or even one block per turn does not fit (naming ``--gpu-mem``).
    """
    if mode not in OFFLOAD_MODES:
        raise SpecError("--offload", mode, ", ".join(OFFLOAD_MODES))
    mem_per_actor = parse_bytes(mem_per_actor)
    plan = plan_shards(config, n_actors=n_actors or 1, mem_per_actor=2**60, dtype=dtype, stream_windows=stream_windows,
                       seqlen=seqlen, method=method, headroom=headroom, nsamples=nsamples)
    plan = replace(plan, mem_per_actor=mem_per_actor)  # the ranges ignore the budget; the device need below does not
    layout = measure_model(config)
    e = DTYPE_BYTES[canonical_dtype(dtype)]
    hessian, micro = needs_hessian(method), default_micro_tokens()
    budget = int(mem_per_actor * (1.0 - headroom))
    shards = []
    for s in plan.shards:
        blocks = [layout.blocks[b] for b in s.blocks]
        largest = max(blocks, key=lambda b: b.params)
        act = estimate_activation(largest, hidden_size=layout.hidden_size, dtype_bytes=e, streams_in_flight=SEARCH_STREAMS,
                                  stream_windows=stream_windows, seqlen=seqlen, hessian=hessian, micro_tokens=micro,
                                  vocab_size=layout.vocab_size, with_head=s.has_head, final_windows=nsamples).total
        ends = s.param_bytes - s.block_param_bytes  # embeddings / head stay on the device
        device = ends + largest.params * e + act
        if device > budget:
            need = format_bytes(device / (1.0 - headroom), round_up=True)
            raise SpecError("--gpu-mem", format_bytes(mem_per_actor),
                            f">= {need} per actor even offloaded (one block, its embeddings/head and the "
                            f"activations of a pass; or lower --seqlen / --nsamples)")
        on_disk = mode == "disk"
        shards.append(OffloadedShard(device_bytes=device, host_bytes=largest.params * e if on_disk else s.block_param_bytes,
                                     disk_bytes=s.block_param_bytes if on_disk else 0))
    return OffloadPlan(plan=plan, mode=mode, shards=tuple(shards), nsamples=nsamples, reason=reason)
