"""A model opened as a chain of shards (in-process, or Ray actors), and what the driver knows of it.

The same `Session` drives one in-process shard (`LocalChain`) or N actors (`RayChain`); functions
here take the parameters they use, the `PruneSpec` stays at the edge (`orchestrator.run`).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroal.data import TokenCache, tokenizer_digest
from neuroal.devices import dtype_name, resolve_device, resolve_dtype
from neuroal.errors import SpecError
from neuroal.families import Family, family_for
from neuroal.fileio import cache_root
from neuroal.methods import Pattern
from neuroal.models import check_checkpoint, load_config, load_tokenizer, resolve_model
from orchestrator.pipeline import LocalChain
from orchestrator.planning import ShardSpec, parse_bytes, plan_shards
from orchestrator.planning.offloaded import OFFLOAD_MODES
from orchestrator.shard import Shard

logger = logging.getLogger(__name__)


def check_positions(config, seqlen: int, flag: str = "--seqlen") -> None:
    """A window longer than the model's positions (`max_position_embeddings`) is refused: learned
    position tables have no row for it, and rotary models were never trained that far."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise SpecError(flag, seqlen, f"at most {limit} (the model's max_position_embeddings)")


def n_blocks_of(config) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))


def planned_shards(config, *, shards: int, gpu_mem: str | None, dtype: str, method: str, stream_windows: int,
                   seqlen: int, nsamples: int = 1, offload: str = "none",
                   head_runs: bool = False) -> tuple[list[ShardSpec], str, str]:
    """Contiguous shards balanced by parameter bytes (orchestrator.planning), checked against --gpu-mem.

    `head_runs`: the session only evaluates, so the last shard's pace counts the lm head's bytes.

    With `offload="auto"`, shards whose blocks do not fit --gpu-mem are offloaded to host memory
    (and that is said); "cpu"/"disk" offload in any case; "none" refuses a plan that does not fit.

    Returns:
        (shard specs, offload mode "none"/"cpu"/"disk", why).
    """
    n_blocks = n_blocks_of(config)
    if not 1 <= shards <= n_blocks:
        raise SpecError("--shards", shards, f"1..{n_blocks} (the model has {n_blocks} blocks)")

    def plan(mem):
        return plan_shards(config, n_actors=shards, mem_per_actor=mem, dtype=dtype, method=method,
                           stream_windows=stream_windows, seqlen=seqlen, nsamples=nsamples,
                           head_runs=head_runs).shard_specs()

    if offload in OFFLOAD_MODES:
        return plan(2**60), offload, f"--offload {offload}"
    if not gpu_mem:
        return plan(2**60), "none", ""
    try:
        return plan(parse_bytes(gpu_mem)), "none", ""
    except SpecError as exc:
        if offload != "auto":
            raise
        why = f"the blocks do not fit --gpu-mem {gpu_mem} ({exc}): offloaded to host memory, one block at a time"
        logger.warning("%s", why)
        return plan(2**60), "cpu", why


@dataclass
class Session:
    model_dir: Path
    config: object
    family: Family
    shard_specs: list[ShardSpec]
    chain: object
    shapes: dict[str, tuple[int, int]]
    started_ray: bool = False  # this session started the embedded Ray instance and stops it
    offload: str = "none"  # "cpu"/"disk": the shards' blocks take turns on the device (passes go block-major)
    offload_reason: str = ""
    token_cache: dict = field(default_factory=dict)  # evaluation token streams, tokenized once
    kwargs_ready: set[int] = field(default_factory=set)
    released_reports: list | None = None  # the shards' reports, kept when their actors were released
    dtype: str = "float32"  # what the shards compute in (`--dtype` resolved on their devices)
    _tokenizer: object = None

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use (an evaluation whose streams are cached needs none)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    @functools.cached_property
    def token_files(self) -> TokenCache | None:
        """Tokenized evaluation streams on disk for this model's tokenizer (`neuroal.data.TokenCache`)."""
        digest = tokenizer_digest(self.model_dir)
        return None if digest is None else TokenCache(cache_root() / "tokens", digest)

    @property
    def n_blocks(self) -> int:
        return self.shard_specs[-1].end_block

    @property
    def parallel(self) -> bool:
        return getattr(self.chain, "parallel", False)

    def ensure_kwargs(self, seqlen: int) -> None:
        """Capture the block kwargs for `seqlen` on the first shard and hand them to every shard."""
        if seqlen in self.kwargs_ready:
            return
        kwargs = self.chain.get(self.chain.call(0, Shard.block_kwargs, seqlen))
        for i in range(self.chain.n_shards):
            self.chain.get(self.chain.configure(i, Shard.set_block_kwargs, seqlen, kwargs))
        self.kwargs_ready.add(seqlen)

    def embed(self, ids: torch.Tensor):
        """A handle to the hidden states entering block 0 for token ids [n, seqlen]."""
        self.ensure_kwargs(ids.shape[1])
        return self.chain.call(0, Shard.embed, ids)

    def ratios_of(self, shard: int, ratios: dict) -> dict:
        """The part of per-block `ratios` that shard `shard` holds."""
        return {b: ratios[b] for b in self.shard_specs[shard].blocks}

    def shard_reports(self) -> list[dict]:
        """What each shard did (`Shard.report`), also after `release_devices`."""
        if self.released_reports is not None:
            return self.released_reports
        return [self.chain.get(self.chain.call(i, Shard.report)) for i in range(self.chain.n_shards)]

    def release_devices(self) -> None:
        """Free the shard actors' GPUs and CPUs for a Ray task that needs them (zero-shot, which loads
        the saved checkpoint itself), keeping their reports: the chain takes no calls after this.
        Nothing to free for in-process shards."""
        release = getattr(self.chain, "release", None)
        if release is None or self.released_reports is not None:
            return
        self.released_reports = self.shard_reports()
        release()

    def close(self) -> None:
        close = getattr(self.chain, "close", None)
        if close:
            close()
        if self.started_ray:
            import ray

            ray.shutdown()


def open_session(
    model: str,
    *,
    executor: str = "ray",
    shards: int = 1,
    dtype: str = "auto",
    device: str = "auto",
    address: str | None = None,
    gpu_mem: str | None = None,
    offload: str = "auto",
    method: str = "wanda",
    stream_windows: int = 8,
    seqlen: int = 2048,
    nsamples: int = 1,
    shard_specs: list[ShardSpec] | None = None,
    resume_dir: Path | None = None,
    head_runs: bool = False,
) -> Session:
    """Open the model as a chain of shards (in-process or Ray actors).

    Args:
        method, stream_windows, seqlen, nsamples: what the shard plan's activation estimate assumes
            (nsamples: the final pass's windows; 1 for a session that only evaluates).
        head_runs: the session only evaluates: every pass runs the lm head, so the shard plan gives
            the last shard fewer blocks (`plan_shards`).
        resume_dir: where shards checkpoint their pruned blocks; a restarted actor or a rerun
            restores them instead of pruning again.
    """
    model_dir = resolve_model(model, weights=False)  # the driver reads config and tokenizer only
    config = load_config(model_dir)
    family = family_for(config)
    check_positions(config, seqlen)
    check_checkpoint(model_dir, config)  # damaged or incomplete weights: one line, before any shard starts
    started_ray = False
    if executor != "local":
        from orchestrator.ray_chain import ensure_ray

        started_ray = ensure_ray(address, os.cpu_count())
    try:
        return _open(model, model_dir, config, family, executor=executor, shards=shards, dtype=dtype, device=device,
                     address=address, gpu_mem=gpu_mem, offload=offload, method=method, stream_windows=stream_windows,
                     seqlen=seqlen, nsamples=nsamples, shard_specs=shard_specs, resume_dir=resume_dir,
                     started_ray=started_ray, head_runs=head_runs)
    except BaseException:
        if started_ray:
            import ray

            ray.shutdown()
        raise


def compute_kind(device: str, executor: str) -> str:
    """"cuda" or "cpu": what the shards will compute on (for the plan's dtype and micro-batches)."""
    if executor == "local":
        return resolve_device(device).type
    import ray

    from orchestrator.placement import wants_gpus

    return "cuda" if wants_gpus(device, ray.cluster_resources().get("GPU", 0)) else "cpu"


def compute_dtype(dtype: str, device: str, executor: str, address: str | None) -> str:
    """The dtype a session would compute in: `--dtype`, or what "auto" resolves to on the devices the
    shards get (a named cluster is asked; in process and the embedded instance are this machine).
    Known before any shard opens, so an evaluation already recorded in it is not made again."""
    if dtype != "auto":
        return dtype
    if executor != "local" and address:
        from orchestrator.ray_chain import ensure_ray

        ensure_ray(address)
        kind = compute_kind(device, executor)
    else:
        kind = resolve_device(device).type
    return dtype_name(resolve_dtype(dtype, torch.device(kind)))


def _open(model, model_dir, config, family, *, executor, shards, dtype, device, address, gpu_mem, offload, method,
          stream_windows, seqlen, nsamples, shard_specs, resume_dir, started_ray, head_runs=False) -> Session:
    kind = compute_kind(device, executor)
    plan_dtype = dtype_name(resolve_dtype(dtype, torch.device(kind)))
    planned, mode, why = planned_shards(config, shards=shards, gpu_mem=gpu_mem, dtype=plan_dtype, method=method,
                                        stream_windows=stream_windows, seqlen=seqlen, nsamples=nsamples,
                                        offload=offload, head_runs=head_runs)
    shard_specs = shard_specs or planned
    budget = parse_bytes(gpu_mem) if gpu_mem else None
    place = dict(offload=mode, budget=budget)
    # shards resolve the model themselves: a hub id, a URI or the default fetches/converts per node
    model_ref = model if not Path(model).expanduser().exists() else model_dir
    if executor == "local":
        held = [Shard(model_ref, s, dtype=dtype, device=device, resume_dir=resume_dir, **place) for s in shard_specs]
        chain = LocalChain(held)
        shapes = held[0].shapes
        computes_in = dtype_name(held[0].dtype)
    else:
        from orchestrator.ray_chain import RayChain

        chain = RayChain(model_ref, shard_specs, dtype=dtype, device=device, address=address, resume_dir=resume_dir,
                         shard_options=place)
        shapes = chain.get(chain.call(0, Shard.get_shapes))
        computes_in = chain.get(chain.call(0, Shard.report))["dtype"]  # a GPU Ray declares without CUDA: fp32
    return Session(model_dir, config, family, shard_specs, chain, shapes,
                   started_ray=started_ray, offload=mode, offload_reason=why, dtype=computes_in)


def check_pattern(shapes: dict[str, tuple[int, int]], pattern: Pattern | None, text: str) -> None:
    """An N:M pattern needs M to divide every prunable linear's input width."""
    if pattern is None:
        return
    bad = [f"{n} ({i})" for n, (_, i) in shapes.items() if i % pattern.m]
    if bad:
        raise SpecError("--pattern", text, f"N:M with M dividing every input width; {', '.join(bad)} is not")
