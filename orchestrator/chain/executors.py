"""What runs the shards: this process, or Ray actors. `--executor` is read here, once (`executor_for`);
past this point code asks the executor or its chain, never the string.

A new executor (one process per GPU without Ray, say) is a subclass here and a `Chain` implementation.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from neuroal.devices import dtype_name, resolve_device, resolve_dtype
from orchestrator.chain.interface import Chain
from orchestrator.chain.shard import Shard


class Executor(ABC):
    in_process: bool  # the shards live in the driver's process

    def __init__(self, address: str | None = None):
        self.address = address

    @property
    def memory_is_here(self) -> bool:
        """The shards' host memory is this machine's (in process, or an embedded Ray instance)."""
        return self.address is None or self.in_process

    def check_reachable(self) -> None:
        """What the shards will run on answers (raises `RayUnavailable` for a Ray address that does not)."""

    def start(self) -> None:
        """Whatever the shards need running before they open (Ray, joined or started)."""

    def stop(self) -> None:
        """Undo `start`: an instance this executor started is stopped, a joined one left running."""

    @abstractmethod
    def device_kind(self, device: str) -> str:
        """"cuda" or "cpu": what the shards compute on (after `start`)."""

    def expected_device_kind(self, device: str) -> str:
        """`device_kind` known before anything starts: a named cluster is asked; in process and an
        embedded instance are this machine."""
        return resolve_device(device).type

    def compute_dtype(self, dtype: str, device: str) -> str:
        """The dtype a session would compute in: `dtype`, or what "auto" resolves to on its devices."""
        if dtype != "auto":
            return dtype
        return dtype_name(resolve_dtype(dtype, torch.device(self.expected_device_kind(device))))

    @abstractmethod
    def open_chain(self, model_ref: str | Path, shard_specs, *, dtype: str, device: str,
                   resume_dir: Path | str | None, shard_options: dict, block_major: bool) -> tuple[Chain, dict, str]:
        """Open the shards as a chain; (chain, prunable linear shapes, the dtype shard 0 computes in)."""


class LocalExecutor(Executor):
    in_process = True

    def device_kind(self, device: str) -> str:
        return resolve_device(device).type

    def open_chain(self, model_ref, shard_specs, *, dtype, device, resume_dir, shard_options, block_major):
        from orchestrator.chain.local import LocalChain

        held = [Shard(model_ref, s, dtype=dtype, device=device, resume_dir=resume_dir, **shard_options)
                for s in shard_specs]
        return LocalChain(held, block_major=block_major), held[0].shapes, dtype_name(held[0].dtype)


class RayExecutor(Executor):
    in_process = False

    def __init__(self, address: str | None = None):
        super().__init__(address)
        self._started = False

    def check_reachable(self) -> None:
        if self.address:
            from orchestrator.chain.ray_runtime import check_address

            check_address(self.address)

    def start(self) -> None:
        from orchestrator.chain.ray_runtime import ensure_ray

        self._started = ensure_ray(self.address, os.cpu_count()) or self._started

    def stop(self) -> None:
        if self._started:
            from orchestrator.chain.ray_runtime import stop_ray

            stop_ray()
            self._started = False

    def device_kind(self, device: str) -> str:
        import ray

        from orchestrator.chain.placement import wants_gpus

        return "cuda" if wants_gpus(device, ray.cluster_resources().get("GPU", 0)) else "cpu"

    def expected_device_kind(self, device: str) -> str:
        if not self.address:
            return super().expected_device_kind(device)
        from orchestrator.chain.ray_runtime import ensure_ray

        ensure_ray(self.address)  # joins (never starts) the named cluster, to ask it
        return self.device_kind(device)

    def open_chain(self, model_ref, shard_specs, *, dtype, device, resume_dir, shard_options, block_major):
        from orchestrator.chain.actors import RayChain

        chain = RayChain(model_ref, shard_specs, dtype=dtype, device=device, resume_dir=resume_dir,
                         shard_options=shard_options, block_major=block_major)
        shapes = chain.get(chain.call(0, Shard.get_shapes))
        computes_in = chain.get(chain.call(0, Shard.report))["dtype"]  # a GPU Ray declares without CUDA: fp32
        return chain, shapes, computes_in


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def executor_for(name: str, address: str | None = None) -> Executor:
    """The executor `--executor name` names ("auto" is resolved in the spec: `spec.resolve_executor`)."""
    return EXECUTORS[name](address)
