"""Where shard actors go: one GPU each when the cluster has GPUs, consecutive shards on one node.

Consecutive shards exchange hidden states after every block of every stream, so they pack onto
the same node where they fit: the nodes with the most free units take the longest runs of shards
(`shard_groups`), and each run is one STRICT_PACK placement group (Ray reschedules a group whole
if its node dies). GPUs the cluster cannot give are an error after a bounded wait for an
autoscaler, never a silent CPU run; a CPU shard asks for at most one node's CPUs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

from neuroal.errors import NeuroalError

logger = logging.getLogger(__name__)

GPU_WAIT_ENV = "NEUROAL_GPU_WAIT_S"  # how long to wait for an autoscaler to add GPUs (default 600 s)


class PlacementError(NeuroalError):
    """The cluster cannot hold the shards as asked; the message says what it has."""


@dataclass(frozen=True)
class Placement:
    """How each shard actor is placed: its Ray resources, compute device and torch threads."""

    bundle: dict  # resources of one shard, e.g. {"GPU": 1, "CPU": 1} or {"CPU": 2}
    groups: tuple[int, ...]  # consecutive shards per placement group (one node each)
    device: str  # "cuda" or "cpu": what the actor computes on, given what Ray gave it
    threads: int | None  # torch threads of a CPU actor (None: leave torch's default)

    @property
    def uses_gpu(self) -> bool:
        return "GPU" in self.bundle


def shard_groups(capacities: list[int], n_shards: int) -> tuple[int, ...] | None:
    """Sizes of the runs of consecutive shards per node: the largest nodes first, full nodes first.

    >>> shard_groups([2, 2], 3), shard_groups([1, 4], 3), shard_groups([1, 1], 3)
    ((2, 1), (3,), None)
    """
    if sum(capacities) < n_shards:
        return None
    groups, left = [], n_shards
    for cap in sorted(capacities, reverse=True):
        if left == 0:
            break
        take = min(cap, left)
        if take:
            groups.append(take)
            left -= take
    return tuple(groups)


def _nodes() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _describe(nodes: list[dict], key: str) -> str:
    return ", ".join(f"{n.get(key, 0):g}" for n in nodes) or "no nodes"


def wants_gpus(device: str, cluster_gpus: float) -> bool:
    """`--device cuda` always; `auto` when the cluster has any GPU; `cpu` never."""
    return device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)


def place_shards(n_shards: int, device: str, *, wait_s: float | None = None, poll_s: float = 5.0) -> Placement:
    """Decide the placement of `n_shards` actors on the connected Ray cluster.

    Raises:
        PlacementError: GPUs asked for (or present) but fewer than one per shard after `wait_s`.
    """
    wait_s = float(os.environ.get(GPU_WAIT_ENV, 600)) if wait_s is None else wait_s
    nodes = _nodes()
    if wants_gpus(device, sum(n.get("GPU", 0) for n in nodes)):
        deadline, said = time.monotonic() + wait_s, 0.0
        while True:
            caps = [int(n.get("GPU", 0)) for n in nodes]
            groups = shard_groups(caps, n_shards)
            if groups is not None:
                break
            if time.monotonic() >= deadline:
                raise PlacementError(
                    f"--shards: {n_shards} shards need {n_shards} GPUs (one each); the cluster has {sum(caps)} "
                    f"(per node: {_describe(nodes, 'GPU')}) after waiting {wait_s:.0f} s for an autoscaler; "
                    "use fewer --shards, add GPU nodes, or --device cpu")
            if time.monotonic() - said >= 30 or said == 0:
                logger.warning("waiting for %d GPUs for %d shards; the cluster has %d (per node: %s)",
                               n_shards, n_shards, sum(caps), _describe(nodes, "GPU"))
                said = time.monotonic()
            time.sleep(poll_s)
            nodes = _nodes()
        cpus = min((n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU", 0) >= 1), default=1)
        bundle = {"GPU": 1, "CPU": max(1, math.floor(cpus))} if cpus >= 1 else {"GPU": 1}
        return Placement(bundle, groups, "cuda", None)
    node_cpus = [n.get("CPU", 0) for n in nodes]
    # at most one node's CPUs per shard; more shards than CPUs (tests, small machines): fractions
    share = min(max(node_cpus, default=1), sum(node_cpus) / n_shards)
    cpus = int(share) if share >= 1 else math.floor(share * 1000) / 1000
    groups = shard_groups([int(c / cpus + 1e-9) for c in node_cpus], n_shards)
    if groups is None:
        raise PlacementError(f"--shards: cannot place {n_shards} CPU shards of {cpus:g} CPUs (per node: "
                             f"{_describe(nodes, 'CPU')})")
    return Placement({"CPU": cpus}, groups, "cpu", max(1, int(share)))
