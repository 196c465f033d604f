"""The chain of shards as Ray actors: one actor per shard, one accelerator each where there are GPUs.

Ray runs already (`orchestrator.chain.ray_runtime`, started by the session's executor). Actors are
placed by `orchestrator.chain.placement` (a GPU each where the cluster has GPUs, consecutive shards packed
on one node) and are restarted by Ray if they die (`max_restarts`); the driver replays what was in
flight.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import weakref
from pathlib import Path

from neuroal.errors import NeuroalError, StorageAccessError
from orchestrator.chain.interface import Chain
from orchestrator.chain.streams import num_returns
from orchestrator.chain.placement import PlacementError, place_shards
from orchestrator.chain.shard import ShardStateLost

logger = logging.getLogger(__name__)


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


WORKER_ENV_ADVICE = ("the driver reached it, so this node lacks the driver's environment: set the same variables "
                     "on the worker nodes, e.g. `ray job submit --runtime-env-json '{\"env_vars\": {...}}'`, or in "
                     "the environment the cluster config gives its workers")


def _storage_checks(model: str, resume_dir: str | None) -> None:
    """The storage a shard reads (`--model`) and writes (`--out`'s resume checkpoints), when they are URIs."""
    from neuroal import fileio

    fileio.check_access(model, "--model")
    if resume_dir is not None:
        fileio.check_access(resume_dir, "--out")


def _shard_actor_class():
    import ray

    from orchestrator.chain.shard import Shard

    class ShardActor(Shard):
        """The plain Shard, with torch threads matched to the actor's CPU share; it reports each block.

        Its constructor's arguments are small and inline (no object-store references, so a restart
        cannot lose them); the progress sink is looked up by name. A shard that cannot set up on its
        node (no credentials for `--out` there, ...) keeps the reason, and `ping` raises it: the
        driver answers with that one line instead of Ray logging a constructor traceback.
        """

        def __init__(self, model, spec, dtype, device, threads, resume_dir, sink_name, options):
            import torch

            self.unusable: NeuroalError | None = None
            self.sink_name, self.sink = sink_name, None
            try:
                _storage_checks(model, resume_dir)
                if threads:
                    torch.set_num_threads(threads)
                super().__init__(model, spec, dtype=dtype, device=device, resume_dir=resume_dir,
                                 gpu_given=bool(ray.get_gpu_ids()), **options)
            except StorageAccessError as exc:
                where = f"shard {spec.index} on node {ray.util.get_node_ip_address()} " \
                        f"({ray.get_runtime_context().get_node_id()[:8]})"
                self.unusable = StorageAccessError(exc.field, exc.location, exc.problem,
                                                   f"{exc.advice}; {WORKER_ENV_ADVICE}", where=where)
                return
            except NeuroalError as exc:
                self.unusable = exc
                return
            self.on_block = self.report_block

        def report_block(self, kind: str, b: int) -> None:
            # one remote call per block: evaluation passes ("forward") are not shown (the bar would
            # restart for every batch) and their ~30 calls per batch cost 8% of perplexity's time
            if kind == "forward":
                return
            if self.sink is None:
                try:
                    self.sink = ray.get_actor(self.sink_name)
                except ValueError:  # released with the chain
                    return
            self.sink.report.remote(self.spec.index, kind, b)

        def __getattr__(self, name: str):
            # reached only for what a shard that could not set up never made (its blocks, shapes, ...):
            # a call that reaches it says why, not which attribute is missing
            unusable = self.__dict__.get("unusable")
            if unusable is not None and not name.startswith("__"):  # Ray's own probes (hasattr) stay as they are
                raise unusable
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def ping(self) -> int:
            if self.unusable is not None:
                raise self.unusable
            return os.getpid()

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def resolve_plugins(self, names: dict) -> tuple[str, dict]:
            """Where this actor runs, and the plug-ins as it resolves them (`neuroal.plugins.resolve_here`)."""
            from neuroal.plugins import resolve_here

            return f"shard {self.spec.index} on node {ray.util.get_node_ip_address()}", resolve_here(names)

    return ray.remote(ShardActor)


def _neuroal_cause(exc: BaseException) -> NeuroalError | None:
    """The NeuroalError a shard raised (what it met setting up, or in a call), or None: the CLI answers it in
    one line, where Ray's wrapper (`RayTaskError`) would print the actor's traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, NeuroalError) else None


class Handle:
    """A call's result on Ray: the object ref, and how to make it again if its actor dies."""

    __slots__ = ("__weakref__", "call", "index", "ref", "siblings")

    def __init__(self, ref, call, index):
        self.ref, self.call, self.index, self.siblings = ref, call, index, None


class RayChain(Chain):
    """Shards as Ray actors; calls return handles and never block.

    Fault tolerance: actors restart (`max_restarts`), on another node if theirs was lost, and
    reload their blocks (pruned ones from their checkpoint). When `get` finds a call lost to a
    dead actor (or its input lost with a node's object store), the chain recovers the lost inputs
    first (resubmitting their calls), waits for the restart, replays the state the actor was given
    (`configure` calls: block kwargs), and resubmits the call; the driver sees the same result.
    """

    in_process = False
    parallel = True

    def __init__(
        self,
        model: str | Path,
        shard_specs,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_restarts: int = 3,
        resume_dir: str | Path | None = None,
        recover_timeout_s: float = 600.0,
        shard_options: dict | None = None,
        block_major: bool = False,
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.block_major = block_major
        self.specs = list(shard_specs)
        self.n_shards = len(self.specs)
        self.max_restarts = max_restarts
        self.recover_timeout_s = recover_timeout_s
        self.recoveries = 0
        self._state: list[list[tuple[str, tuple]]] = [[] for _ in self.specs]
        self.placement = place_shards(self.n_shards, device)
        p = self.placement
        # by name, not a handle in the shards' constructor arguments: Ray keeps a handle argument in the
        # object store, and a restart whose arguments were lost would fail (ray-project/ray#53727)
        sink_name = f"neuroal-progress-{uuid.uuid4().hex}"
        self.sink = _progress_sink_class().options(name=sink_name).remote()
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
                    None if resume_dir is None else str(resume_dir), sink_name, shard_options or {}))
            first += size
        try:
            self._pids = ray.get([a.ping.remote() for a in self.actors])  # a new pid = a restarted actor
        except ray.exceptions.RayTaskError as exc:
            problem = _neuroal_cause(exc)
            if problem is None:
                raise
            self.release()
            raise problem from exc

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
                    problem = _neuroal_cause(exc)
                    if problem is not None:
                        raise problem from exc
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
        import ray

        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            try:
                pid = ray.get(self.actors[shard].ping.remote(), timeout=60)
                break
            except ray.exceptions.RayTaskError as exc:  # restarted where it cannot set up: say why, once
                problem = _neuroal_cause(exc)
                if problem is None:
                    raise
                raise problem from exc
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError) as exc:
                if getattr(exc, "actor_init_failed", False) or time.monotonic() > deadline:
                    raise  # a constructor that raised is not restarted by Ray: no use waiting
                time.sleep(0.5)
        if pid == self._pids[shard]:
            return  # this actor lived; the call failed for a lost input, now recovered
        self._pids[shard] = pid
        for name, args in self._state[shard]:
            ray.get(getattr(self.actors[shard], name).remote(*self._refs(args)))
        self.recoveries += 1

    def check_plugins(self, names: dict[str, str]) -> None:
        """Every shard actor loads the plug-ins `names` ({field: name}) and the same version of each as this
        process does, before any work: the method crosses to them by name, a top-up's summaries by
        reference to its class, and each actor imports the package where it runs.

        Raises:
            PluginUnavailable: naming the field, the shard and its node, and what to install.
        """
        import ray

        from neuroal.plugins import check_found

        for where, found in ray.get([a.resolve_plugins.remote(names) for a in self.actors]):
            check_found(names, found, where)

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
        self.release()
