"""Zero-shot via lm-eval on a saved checkpoint: in process, or as a Ray task with the devices the shards had.

Zero-shot runs any task, group or tag lm-eval knows, the user's own task YAMLs (`--zeroshot-include`)
and few-shot prompts (`--num-fewshot`), in process or as a Ray task. The include folder is read once
on the driver into a `TaskFolder` whose YAML and `.py` hook files travel with the Ray task: a worker
that cannot read the folder (another node) writes them to a temporary folder and runs from there.
Data files the YAMLs name (`dataset_kwargs: data_files:`) are read where the task runs: give them as
absolute paths on storage every node sees, as `--data-dir` is.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from neuroal import fileio
from neuroal.errors import NeuroalError
from neuroal.zeroshot import TaskFolder
from orchestrator.chain.executors import executor_for
from orchestrator.chain.ray_runtime import TransientError, transient
from orchestrator.chain.session import Session
from orchestrator.results.run_folder import local_checkpoint


def task_folder(path: str | None) -> TaskFolder | None:
    """The user's task folder (`--zeroshot-include`) read on the driver, or None."""
    from neuroal.zeroshot import read_task_folder

    return None if path is None else read_task_folder(path, field="--zeroshot-include")


@contextlib.contextmanager
def task_folder_here(folder: TaskFolder | None):
    """A local path holding `folder`'s definitions: the folder itself when this machine reads the same
    files there (the driver's), else a temporary copy written from the ones that came with the task."""
    from neuroal.zeroshot import read_task_folder, write_task_folder

    if folder is None:
        yield None
        return
    try:
        if read_task_folder(folder.path).digest == folder.digest:
            yield folder.path
            return
    except NeuroalError:
        pass  # not here, or not the same: the shipped copy
    with tempfile.TemporaryDirectory(prefix="neuroal-tasks-") as tmp:
        yield str(write_task_folder(folder, Path(tmp)))


def zeroshot(location: str, tasks, data_dir, limit, device: str = "auto", *, num_fewshot: int = 0,
             include: TaskFolder | None = None, dtype: str = "auto") -> list[dict]:
    """lm-eval tasks on a saved checkpoint, loaded the way users load it, on `device`, in `dtype`.

    On CUDA the model is spread over this process's GPUs (`device_map="auto"`). Returns one dict per
    (task, metric): task, metric, value, stderr, n_docs, the compute dtype and the name it was
    requested under.
    """
    from neuroal.devices import dtype_name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroal.data import resolve_data_dir
    from neuroal.devices import resolve_device, resolve_dtype
    from neuroal.zeroshot import evaluate_zeroshot

    folder, cleanup = local_checkpoint(location)
    try:
        dev = resolve_device(device)
        kw = {"device_map": "auto"} if dev.type == "cuda" else {}
        computes_in = resolve_dtype(dtype, dev)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=computes_in, **kw)
        with task_folder_here(include) as include_path:
            results = evaluate_zeroshot(model, AutoTokenizer.from_pretrained(folder), list(tasks),
                                        data_dir=resolve_data_dir(data_dir), limit=limit, device=str(dev),
                                        num_fewshot=num_fewshot, include_path=include_path)
    except Exception as exc:
        if transient(exc):
            raise TransientError(f"out of memory in zero-shot evaluation of {location}: {exc}") from exc
        raise
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    return [{"task": r.task, "metric": r.metric, "value": r.value, "stderr": r.stderr, "n_docs": r.n_docs,
             "dtype": dtype_name(computes_in), "request": r.request} for r in results]


def zeroshot_resources(placement, n_shards: int, node: dict) -> dict:
    """Ray resources of the zero-shot task: the GPUs and CPUs the shard actors held (released
    first), capped by `node`'s: the driver's node for a local checkpoint, the largest node otherwise
    (lm-eval runs in one process; `device_map="auto"` spreads the model over the GPUs it gets)."""
    gpus = placement.bundle.get("GPU", 0) * n_shards
    cpus = placement.bundle.get("CPU", 0) * n_shards
    return {"num_gpus": min(gpus, int(node.get("GPU", 0))), "num_cpus": min(cpus, node.get("CPU", 0))}


def torch_threads_of_task() -> int | None:
    """The CPUs Ray assigned the running task, as torch threads (Ray starts its workers with one
    thread); None when it has less than one CPU."""
    import ray

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    return cpus if cpus >= 1 else None


def _zeroshot_task(location: str, tasks, data_dir, limit, num_fewshot: int = 0,
                   include: TaskFolder | None = None, dtype: str = "auto") -> list[dict]:
    import torch

    before, threads = torch.get_num_threads(), torch_threads_of_task()
    if threads:
        torch.set_num_threads(threads)
    try:
        return zeroshot(location, tasks, data_dir, limit, num_fewshot=num_fewshot, include=include, dtype=dtype)
    finally:
        torch.set_num_threads(before)  # the worker process may serve other tasks


def zeroshot_where_the_gpus_are(session: Session, location: str, tasks, data_dir, limit, *, num_fewshot: int = 0,
                                include: TaskFolder | None = None, dtype: str = "auto") -> list[dict]:
    """Zero-shot on the checkpoint: in process for an in-process run, else a Ray task with the GPUs
    and CPUs the shards had (never the whole model inside the driver).

    The shard actors are released first (`Session.release_devices`): the task loads the saved
    checkpoint itself, and while they lived it could not get their GPUs (one GPU node, every GPU a
    shard: the task waited forever) nor their CPUs (a CPU session: one thread, or waiting forever
    for a storage URI).
    """
    if session.chain.in_process:
        return zeroshot(location, tasks, data_dir, limit, num_fewshot=num_fewshot, include=include, dtype=dtype)
    placement = session.chain.placement
    session.release_devices()
    return zeroshot_on_ray(placement, session.chain.n_shards, location, tasks, data_dir, limit,
                           num_fewshot=num_fewshot, include=include, dtype=dtype)


def zeroshot_without_shards(location: str, tasks, data_dir, limit, *, executor: str, shards: int, device: str,
                            address: str | None, num_fewshot: int = 0, include: TaskFolder | None = None,
                            dtype: str = "auto") -> list[dict]:
    """Zero-shot when nothing else is evaluated: no shard actor loads the model only to hand its
    devices over; the Ray task gets what `shards` actors would hold (`place_shards`)."""
    runner = executor_for(executor, address)
    if runner.in_process:
        return zeroshot(location, tasks, data_dir, limit, device, num_fewshot=num_fewshot, include=include,
                        dtype=dtype)
    from orchestrator.chain.placement import place_shards

    runner.start()
    try:
        return zeroshot_on_ray(place_shards(shards, device), shards, location, tasks, data_dir, limit,
                               num_fewshot=num_fewshot, include=include, dtype=dtype)
    finally:
        runner.stop()


def zeroshot_on_ray(placement, n_shards: int, location: str, tasks, data_dir, limit, *, num_fewshot: int = 0,
                    include: TaskFolder | None = None, dtype: str = "auto") -> list[dict]:
    """A Ray task with `zeroshot_resources`. A local `location` lives on the driver's machine, so the
    task is pinned to that node (and its GPUs, if it has any); a storage URI runs on any node. The
    user's task definitions (`include`) travel with the task by value (`task_folder_here`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if fileio.is_uri(location):
        node = max(nodes, key=lambda n: (n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0)))
        opts = zeroshot_resources(placement, n_shards, node["Resources"])
    else:
        here = ray.get_runtime_context().get_node_id()
        node = next((n for n in nodes if n["NodeID"] == here), {"Resources": {}})  # a client driver: no node
        opts = dict(zeroshot_resources(placement, n_shards, node["Resources"]),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    task = ray.remote(_zeroshot_task).options(max_retries=2, retry_exceptions=[TransientError], **opts)
    try:
        return ray.get(task.remote(location, list(tasks), None if data_dir is None else str(data_dir), limit,
                                   num_fewshot, include, dtype))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, NeuroalError):  # one line, as in process (not the worker's traceback)
            raise exc.cause from None
        raise
