"""A model opened as a chain of shards (in-process, or Ray actors), and what the driver knows of it.

The same `Session` drives one in-process shard (`LocalChain`) or N actors (`RayChain`) through the
`Chain` interface; `--executor` and `--offload` are read once, in `open_session`. Functions here take
the parameters they use, the `PruneSpec` stays at the edge (`orchestrator.pruning.job`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroal.data import TokenCache, tokenizer_digest
from neuroal.devices import dtype_name, resolve_dtype
from neuroal.errors import SpecError
from neuroal.families import Family, family_for
from neuroal.fileio import cache_root
from neuroal.methods import Pattern
from neuroal.models import check_checkpoint, load_config, load_tokenizer, resolve_model
from orchestrator.chain.executors import Executor, executor_for
from orchestrator.chain.interface import Chain
from orchestrator.planning import ShardSpec, parse_bytes, plan_shards
from orchestrator.planning.offloaded import resident_or_offloaded
from orchestrator.chain.shard import Shard

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

    resident, mode, why = resident_or_offloaded(offload, lambda: plan(parse_bytes(gpu_mem) if gpu_mem else 2**60),
                                                f"--gpu-mem {gpu_mem}")
    if mode is None:
        return resident, "none", ""
    logger.warning("%s", why)
    return plan(2**60), mode, why


@dataclass(frozen=True)
class Offload:
    """The shards' blocks live in host memory ("cpu") or on disk ("disk") and take turns on the device."""

    mode: str
    why: str


@dataclass
class Session:
    model_dir: Path
    config: object
    family: Family
    shard_specs: list[ShardSpec]
    chain: Chain
    shapes: dict[str, tuple[int, int]]
    executor: Executor
    offload: Offload | None = None  # offloaded shards (their chain takes passes block-major)
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
        the saved checkpoint itself), keeping their reports: the chain takes no calls after this."""
        if self.released_reports is not None:
            return
        self.released_reports = self.shard_reports()
        self.chain.release()

    def close(self) -> None:
        try:
            self.chain.close()
        finally:
            self.executor.stop()


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
    runner = executor_for(executor, address)
    runner.start()
    try:
        kind = runner.device_kind(device)
        plan_dtype = dtype_name(resolve_dtype(dtype, torch.device(kind)))
        planned, mode, why = planned_shards(config, shards=shards, gpu_mem=gpu_mem, dtype=plan_dtype, method=method,
                                            stream_windows=stream_windows, seqlen=seqlen, nsamples=nsamples,
                                            offload=offload, head_runs=head_runs)
        offloaded = None if mode == "none" else Offload(mode, why)
        place = dict(offload=mode, budget=parse_bytes(gpu_mem) if gpu_mem else None)
        # shards resolve the model themselves: a hub id, a URI or the default fetches/converts per node
        model_ref = model if not Path(model).expanduser().exists() else model_dir
        chain, shapes, computes_in = runner.open_chain(model_ref, shard_specs or planned, dtype=dtype, device=device,
                                                       resume_dir=resume_dir, shard_options=place,
                                                       block_major=offloaded is not None)
    except BaseException:
        runner.stop()
        raise
    return Session(model_dir, config, family, shard_specs or planned, chain, shapes, runner, offload=offloaded,
                   dtype=computes_in)


def compute_dtype(dtype: str, device: str, executor: str, address: str | None) -> str:
    """The dtype a session would compute in: `--dtype`, or what "auto" resolves to on the devices the
    shards get (a named cluster is asked; in process and the embedded instance are this machine).
    Known before any shard opens, so an evaluation already recorded in it is not made again."""
    return executor_for(executor, address).compute_dtype(dtype, device)


def check_pattern(shapes: dict[str, tuple[int, int]], pattern: Pattern | None, text: str) -> None:
    """An N:M pattern needs M to divide every prunable linear's input width."""
    if pattern is None:
        return
    bad = [f"{n} ({i})" for n, (_, i) in shapes.items() if i % pattern.m]
    if bad:
        raise SpecError("--pattern", text, f"N:M with M dividing every input width; {', '.join(bad)} is not")
