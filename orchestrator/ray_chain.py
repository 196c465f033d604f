"""The chain of shards as Ray actors: one actor per shard, one accelerator each where there are GPUs.

Without an address (`--address` / `RAY_ADDRESS`) a local Ray instance starts inside this process
(dashboard on 127.0.0.1 only; Ray's token authentication stays as Ray configures it). Actors are
placed with a placement group (one bundle per shard, spread over nodes as resources allow) and are
restarted by Ray if they die (`max_restarts`); the driver replays what was in flight.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def _shard_actor_class():
    import ray

    from orchestrator.shard import Shard

    class ShardActor(Shard):
        """The plain Shard, with torch threads matched to the actor's CPU share."""

        def __init__(self, model, spec, dtype, device, threads):
            import torch

            if threads:
                torch.set_num_threads(threads)
            super().__init__(model, spec, dtype=dtype, device=device)

        def ping(self) -> int:
            return os.getpid()

        def peak_rss(self) -> int:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    return ray.remote(ShardActor)


class RayChain:
    """Shards as Ray actors; calls return object refs and never block."""

    parallel = True

    def __init__(
        self,
        model: str | Path,
        shard_specs,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        address: str | None = None,
        max_restarts: int = 3,
        num_cpus: int | None = None,
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                ray.init(
                    num_cpus=num_cpus or os.cpu_count(),
                    dashboard_host="127.0.0.1",
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=True,
                )
                self._started = True
        self.specs = list(shard_specs)
        self.n_shards = len(self.specs)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = gpus >= self.n_shards and device != "cpu"
        cpus = max(1, int(resources.get("CPU", 1)) // self.n_shards)
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": cpus}
        self.pg = placement_group([dict(bundle) for _ in self.specs], strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        cls = _shard_actor_class()
        self.actors = []
        for i, spec in enumerate(self.specs):
            opts = dict(
                num_cpus=bundle.get("CPU", 1),
                num_gpus=bundle.get("GPU", 0),
                max_restarts=max_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            )
            self.actors.append(
                cls.options(**opts).remote(str(model), spec, dtype, "cuda" if use_gpu else "cpu", None if use_gpu else cpus)
            )
        ray.get([a.ping.remote() for a in self.actors])

    def call(self, shard: int, method: str, *args):
        return getattr(self.actors[shard], method).remote(*args)

    def call2(self, shard: int, method: str, *args):
        return getattr(self.actors[shard], method).options(num_returns=2).remote(*args)

    def wait(self, handles):
        import ray

        ready, _ = ray.wait(list(handles), num_returns=1)
        return ready

    def get(self, handle):
        import ray

        return ray.get(handle)

    def put(self, value):
        import ray

        return ray.put(value)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
        if self._started:
            ray.shutdown()
