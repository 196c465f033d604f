"""The chain of shards as Ray actors: one actor per shard, one accelerator each where there are GPUs.

Without an address (`--address` / `RAY_ADDRESS`) a local Ray instance starts inside this process
(dashboard on 127.0.0.1 only; Ray's token authentication stays as Ray configures it). Actors are
placed by `orchestrator.placement` (a GPU each where the cluster has GPUs, consecutive shards packed
on one node) and are restarted by Ray if they die (`max_restarts`); the driver replays what was in
flight.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

from orchestrator.pipeline import num_returns
from orchestrator.placement import PlacementError, place_shards
from orchestrator.shard import ShardStateLost

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, or start an embedded instance; True if this call started one.

    An embedded instance is always new (`address="local"`): never a stray cluster that happens to
    run on the machine. Nothing happens if Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
             include_dashboard=False, logging_level=logging.WARNING)
    return True


def _progress_sink_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressSink:
        """Collects (shard, kind, block) events from the actors; the driver drains it periodically."""

        def __init__(self):
            self.events = []

        def report(self, shard: int, kind: str, block: int) -> None:
            self.events.append((shard, kind, block))

        def drain(self) -> list:
            out, self.events = self.events, []
            return out

    return ProgressSink


def _shard_actor_class():
    import ray

    from orchestrator.shard import Shard

    class ShardActor(Shard):
        """The plain Shard, with torch threads matched to the actor's CPU share; it reports each block."""

        def __init__(self, model, spec, dtype, device, threads, resume_dir, sink, options):
            import torch

            if threads:
                torch.set_num_threads(threads)
            super().__init__(model, spec, dtype=dtype, device=device, resume_dir=resume_dir,
                             gpu_given=bool(ray.get_gpu_ids()), **options)
            self.sink = sink
            self.on_block = self.report_block

        def report_block(self, kind: str, b: int) -> None:
            # one remote call per block: evaluation passes ("forward") are not shown (the bar would
            # restart for every batch) and their ~30 calls per batch cost 8% of perplexity's time
            if kind != "forward":
                self.sink.report.remote(self.spec.index, kind, b)

        def ping(self) -> int:
            return os.getpid()

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return ray.remote(ShardActor)


class Handle:
    """A call's result on Ray: the object ref, and how to make it again if its actor dies."""

    __slots__ = ("__weakref__", "call", "index", "ref", "siblings")

    def __init__(self, ref, call, index):
        self.ref, self.call, self.index, self.siblings = ref, call, index, None


class RayChain:
    """Shards as Ray actors; calls return handles and never block.

    Fault tolerance: actors restart (`max_restarts`), on another node if theirs was lost, and
    reload their blocks (pruned ones from their checkpoint). When `get` finds a call lost to a
    dead actor (or its input lost with a node's object store), the chain recovers the lost inputs
    first (resubmitting their calls), waits for the restart, replays the state the actor was given
    (`configure` calls: block kwargs), and resubmits the call; the driver sees the same result.
    """

    parallel = True

    def __init__(
        self,
        model: str | Path,
        shard_specs,
        *,
        dtype: str = "auto",
        device: str = "auto",
        address: str | None = None,
        max_restarts: int = 3,
        num_cpus: int | None = None,
        resume_dir: str | Path | None = None,
        recover_timeout_s: float = 600.0,
        shard_options: dict | None = None,
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._started = ensure_ray(address, num_cpus or os.cpu_count())
        self.specs = list(shard_specs)
        self.n_shards = len(self.specs)
        self.max_restarts = max_restarts
        self.recover_timeout_s = recover_timeout_s
        self.recoveries = 0
        self._state: list[list[tuple[str, tuple]]] = [[] for _ in self.specs]
        self.placement = place_shards(self.n_shards, device)
        p = self.placement
        self.sink = _progress_sink_class().remote()
        self._progress_thread = None
        self.pgs, self.actors = [], []
        cls = _shard_actor_class()
        first = 0
        for size in p.groups:  # a run of consecutive shards per node (one STRICT_PACK group each)
            pg = placement_group([dict(p.bundle) for _ in range(size)], strategy="STRICT_PACK")
            self.pgs.append(pg)
            try:
                ray.get(pg.ready(), timeout=300)
            except ray.exceptions.GetTimeoutError:
                self._remove_groups()
                raise PlacementError(f"--shards: Ray cannot place {size} shards of {p.bundle} on one node "
                                     f"(cluster: {ray.cluster_resources()})") from None
            for j in range(size):
                opts = dict(
                    num_cpus=p.bundle.get("CPU", 0),
                    num_gpus=p.bundle.get("GPU", 0),
                    max_restarts=max_restarts,
                    max_task_retries=0,  # the chain replays lost calls itself (it knows their inputs)
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=j),
                )
                # an actor given a GPU computes on it ("auto"), or on CPU if the GPU is Ray's fiction
                actor_device = "auto" if p.uses_gpu else "cpu"
                self.actors.append(cls.options(**opts).remote(
                    str(model), self.specs[first + j], dtype, actor_device, p.threads,
                    None if resume_dir is None else str(resume_dir), self.sink, shard_options or {}))
            first += size
        self._pids = ray.get([a.ping.remote() for a in self.actors])  # a new pid = a restarted actor

    # ------------------------------------------------------------------ submission

    @staticmethod
    def _refs(args):
        return tuple(a.ref if isinstance(a, Handle) else a for a in args)

    def _submit(self, call):
        shard, name, args, n = call
        if not self.actors:
            raise RuntimeError(f"{name} on shard {shard}: this chain's actors were released (Session.release_devices)")
        fn = getattr(self.actors[shard], name)
        if n > 1:
            fn = fn.options(num_returns=n)
        refs = fn.remote(*self._refs(args))
        return refs if n > 1 else [refs]

    def call(self, shard: int, method, *args):
        """Submit `method` (a `Shard` method) on shard i; one handle, or a tuple for `two_results`."""
        call = (shard, method.__name__, args, num_returns(method))
        hs = [Handle(r, call, i) for i, r in enumerate(self._submit(call))]
        for h in hs:  # weak: a strong cycle would keep the results alive until Python's cycle collector runs
            h.siblings = [weakref.ref(x) for x in hs]
        return tuple(hs) if len(hs) > 1 else hs[0]

    def configure(self, shard: int, method, *args) -> Handle:
        """A call that sets actor state: replayed, in order, on a restarted actor (the replay policy)."""
        self._state[shard].append((method.__name__, args))
        return self.call(shard, method, *args)

    def wait(self, handles):
        import ray

        by_ref = {h.ref: h for h in handles}
        ready, _ = ray.wait(list(by_ref), num_returns=1)
        return [by_ref[r] for r in ready]

    # ------------------------------------------------------------------ results and recovery

    def get(self, handle):
        import ray

        if not isinstance(handle, Handle):
            return ray.get(handle)
        for attempt in range(self.max_restarts + 1):
            try:
                return ray.get(handle.ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.ObjectLostError, ray.exceptions.RayTaskError) as exc:
                # an actor, or a node with its objects, was lost; or a call reached the restarted actor
                # before its state was replayed (ShardStateLost): all recovered the same way
                lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)
                if not isinstance(exc, lost) and not isinstance(getattr(exc, "cause", None), ShardStateLost):
                    raise
                if attempt == self.max_restarts:
                    raise
                shard = handle.call[0]
                logger.warning("shard %d lost a %s call (%s); recovering and replaying", shard, handle.call[1],
                               type(exc).__name__)
                # the lost input may be an upstream call on another (restarting) actor: recover those
                # first, so the resubmitted call gets inputs that exist
                for arg in handle.call[2]:
                    if isinstance(arg, Handle):
                        self.get(arg)
                self._recover(shard)
                for sibling, ref in zip(handle.siblings, self._submit(handle.call)):
                    h = sibling()
                    if h is not None:
                        h.ref = ref
        raise AssertionError("unreachable")

    def _recover(self, shard: int) -> None:
        """Wait for Ray to restart the actor (it reloads its blocks), then replay its state."""
        import time

        import ray

        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            try:
                pid = ray.get(self.actors[shard].ping.remote(), timeout=60)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        if pid == self._pids[shard]:
            return  # this actor lived; the call failed for a lost input, now recovered
        self._pids[shard] = pid
        for name, args in self._state[shard]:
            ray.get(getattr(self.actors[shard], name).remote(*self._refs(args)))
        self.recoveries += 1

    def node_ids(self) -> list[str]:
        """The Ray node each shard's actor runs on, in chain order."""
        import ray

        return ray.get([a.node_id.remote() for a in self.actors])

    def peak_rss(self) -> list[int]:
        import ray

        return [r["peak_rss_bytes"] for r in ray.get([a.report.remote() for a in self.actors])]

    def set_progress(self, callback, interval_s: float = 0.5) -> None:
        """Call `callback(kind, block)` for every block an actor finishes (polled in a thread)."""
        import threading

        import ray

        stop = threading.Event()

        def poll():
            while not stop.wait(interval_s):
                try:
                    events = ray.get(self.sink.drain.remote(), timeout=30)
                except Exception:  # a progress bar is never worth failing the run
                    continue
                for _shard, kind, b in events:
                    callback(kind, b)

        self._progress_thread = (threading.Thread(target=poll, daemon=True, name="neuroal-progress"), stop)
        self._progress_thread[0].start()

    def _remove_groups(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            remove_placement_group(pg)

    def release(self) -> None:
        """Kill the actors and free their placement groups, so their GPUs and CPUs go to whatever runs
        next (zero-shot after perplexity); the chain takes no calls after this. Idempotent."""
        import ray

        if self._progress_thread is not None:
            self._progress_thread[1].set()
            self._progress_thread[0].join(timeout=5)
            self._progress_thread = None
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self._remove_groups()
        if self.sink is not None:
            ray.kill(self.sink)
        self.actors, self.pgs, self.sink = [], [], None

    def close(self) -> None:
        import ray

        self.release()
        if self._started:
            ray.shutdown()
