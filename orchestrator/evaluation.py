"""Evaluation where the model is: perplexity streamed through the shard chain, zero-shot via lm-eval.

Zero-shot runs any task, group or tag lm-eval knows, the user's own task YAMLs (`--zeroshot-include`)
and few-shot prompts (`--num-fewshot`), in process or as a Ray task. The include folder is read once
on the driver into a `TaskFolder` whose YAML and `.py` hook files travel with the Ray task: a worker
that cannot read the folder (another node) writes them to a temporary folder and runs from there.
Data files the YAMLs name (`dataset_kwargs: data_files:`) are read where the task runs: give them as
absolute paths on storage every node sees, as `--data-dir` is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path

from neuroal import fileio
from neuroal.data import perplexity_tokens, perplexity_windows
from neuroal.errors import NeuroalError
from neuroal.zeroshot import TaskFolder
from orchestrator.pipeline import block_major
from orchestrator.session import Session
from orchestrator.shard import Shard
from orchestrator.tasks import Forward

logger = logging.getLogger(__name__)

BLOCK_MAJOR_BYTES = 2 * 2**30  # hidden states an offloaded evaluation holds at once (one block move each)


class TransientError(NeuroalError):
    """A failure worth retrying (out of memory on a device, a lost node): Ray retries tasks raising it."""


def transient(exc: BaseException) -> bool:
    """CUDA / host out-of-memory: another attempt (on another worker) may succeed."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def perplexity(
    session: Session, name: str, seqlen: int, data_dir, *, batch: int = 4, max_windows: int | None = None
) -> tuple[float, dict]:
    """exp(mean NLL) over non-overlapping windows of the dataset's test stream (papers' protocol).

    Batches of `batch` windows stream through the chain (on Ray every shard works on a different
    batch at once), at most 2 per shard in flight, so no shard's outputs pile up in the object store;
    an offloaded chain takes the batches block-major instead, in groups of up to BLOCK_MAJOR_BYTES
    of hidden states, so each block moves to the device once per group. `max_windows` keeps only
    the first windows (a quick estimate, recorded as such). The token stream is tokenized once per
    tokenizer and text, and kept on disk for the next command (`neuroal.data.TokenCache`).
    """
    key = (name, str(data_dir), seqlen)  # C4 is cut to 256 windows of seqlen
    if key not in session.token_cache:
        session.token_cache[key] = perplexity_tokens(name, lambda: session.tokenizer, seqlen, data_dir,
                                                     cache=session.token_files)
    ids, origin = session.token_cache[key]
    windows = perplexity_windows(ids, seqlen)
    all_windows = windows.shape[0]
    if max_windows is not None:
        windows = windows[:max_windows]
    session.ensure_kwargs(seqlen)
    chain = session.chain
    last = chain.n_shards - 1
    chunks = [windows[i : i + batch] for i in range(0, windows.shape[0], batch)]
    total = 0.0
    if session.offload != "none":
        hidden_bytes = batch * seqlen * session.config.hidden_size * 4
        per_group = max(1, BLOCK_MAJOR_BYTES // hidden_bytes)
        for g in range(0, len(chunks), per_group):
            for h in _block_major_nll(chain, chunks[g : g + per_group]):
                total += chain.get(h)[0]
    else:
        pending = []
        for chunk in chunks:
            hidden = chain.call(0, Shard.embed, chunk)
            for k in range(chain.n_shards):
                hidden, _ = chain.call(k, Shard.run, Forward(), hidden, 0.0)
            pending.append(chain.call(last, Shard.nll, hidden, chunk))
            if len(pending) > 2 * chain.n_shards:  # back-pressure: a fast first shard does not run ahead
                total += chain.get(pending.pop(0))[0]
        for h in pending:
            total += chain.get(h)[0]
    n = windows.shape[0]
    return math.exp(total / (n * seqlen)), {"origin": origin, "windows": n, "windows_available": all_windows,
                                            "tokens": int(ids.numel())}


def _block_major_nll(chain, chunks) -> list:
    """Handles of the NLL of each chunk, all chunks taken through the chain block-major."""
    wires = [chain.get(chain.call(0, Shard.embed, c)) for c in chunks]
    hidden, _ = block_major(chain, lambda _shard: [Forward() for _ in chunks], wires)
    return [chain.call(chain.n_shards - 1, Shard.nll, h, c) for h, c in zip(chain.get(hidden), chunks)]


def evaluate(session: Session, location: str, *, perplexity_sets=(), seqlen: int, windows: int | None = None,
             zeroshot_tasks=(), limit: int | None = None, data_dir=None, timings: dict | None = None,
             num_fewshot: int = 0, include: TaskFolder | None = None) -> dict:
    """Perplexities through the session's shards and zero-shot tasks on the checkpoint at `location`.

    Returns {"perplexity": {name: value}, "eval_data": {name: info}, "zeroshot": [rows],
    "evaluations": [entries]}, each result carrying its `eval_key` and protocol, so a store never mixes
    evaluations made differently. Zero-shot comes last: on Ray it releases the shard actors
    (`zeroshot_where_the_gpus_are`).
    """
    import time

    from orchestrator.spec import eval_key

    timings = {} if timings is None else timings
    out = {"perplexity": {}, "eval_data": {}, "zeroshot": [], "evaluations": []}
    t = time.perf_counter()
    for name in perplexity_sets:
        value, info = perplexity(session, name, seqlen, data_dir, max_windows=windows)
        out["perplexity"][name] = value
        out["eval_data"][name] = dict(info, seqlen=seqlen, dtype=session.dtype,
                                      eval_key=eval_key("perplexity", name, seqlen=seqlen, windows=windows,
                                                        dtype=session.dtype))
        out["evaluations"].append(perplexity_entry(name, value, out["eval_data"][name]))
    timings["eval"] = timings.get("eval", 0.0) + time.perf_counter() - t
    if zeroshot_tasks:
        t = time.perf_counter()
        rows = zeroshot_where_the_gpus_are(session, location, list(zeroshot_tasks), data_dir, limit,
                                           num_fewshot=num_fewshot, include=include, dtype=session.dtype)
        out["zeroshot"] = keyed_zeroshot(rows, limit, num_fewshot=num_fewshot, include=include)
        out["evaluations"] += zeroshot_entries(out["zeroshot"], limit, num_fewshot=num_fewshot)
        timings["zeroshot"] = timings.get("zeroshot", 0.0) + time.perf_counter() - t
    return out


def protocol(*, seqlen: int | None = None, windows: int | None = None, windows_available: int | None = None,
             limit: int | None = None, n_docs: int | None = None, num_fewshot: int = 0,
             dtype: str | None = None) -> str:
    """How an evaluation was made, in words (run.json, the store, the summary and the report).

    >>> protocol(seqlen=256, windows=16, windows_available=1234)
    'seqlen 256, 16 of 1234 windows'
    >>> protocol(limit=100, n_docs=100)
    '100 documents (--zeroshot-limit 100)'
    >>> protocol(n_docs=20, num_fewshot=2, dtype="bfloat16")
    '20 documents (all), 2-shot, bfloat16'
    """
    in_dtype = f", {dtype}" if dtype else ""
    if seqlen is not None:
        part = "all" if windows == windows_available else f"{windows} of"
        return f"seqlen {seqlen}, {part} {windows_available} windows" + in_dtype
    shots = f", {num_fewshot}-shot" if num_fewshot else ""
    return (f"{n_docs} documents" + (f" (--zeroshot-limit {limit})" if limit is not None else " (all)") + shots
            + in_dtype)


def perplexity_entry(name: str, value: float, info: dict) -> dict:
    """One perplexity evaluation as `run.json["evaluations"]` keeps it: value, its `eval_data` info
    (eval key, seqlen, windows, origin) and the protocol in words."""
    available = info.get("windows_available", info["windows"])
    return {"kind": "perplexity", "task": name, "metric": "perplexity", "value": value, "stderr": None,
            **info, "windows_available": available,
            "protocol": protocol(seqlen=info["seqlen"], windows=info["windows"], windows_available=available,
                                 dtype=info.get("dtype"))}


def zeroshot_entries(rows: list[dict], limit: int | None, *, num_fewshot: int = 0) -> list[dict]:
    """Keyed zero-shot rows as `run.json["evaluations"]` keeps them: with the limit, shots and protocol."""
    return [dict(r, kind="zeroshot", limit=limit, num_fewshot=num_fewshot,
                 protocol=protocol(limit=limit, n_docs=r.get("n_docs"), num_fewshot=num_fewshot,
                                   dtype=r.get("dtype"))) for r in rows]


def zeroshot_key(name: str, limit: int | None, *, num_fewshot: int = 0, include: TaskFolder | None = None,
                 dtype: str | None = None) -> str:
    """The eval key of zero-shot task (or group) `name`: its limit, shots, compute dtype, and, for a
    task of the user's folder, the digest of that folder's definitions."""
    from orchestrator.spec import eval_key

    definitions = include.digest if include is not None and name in include.names else None
    return eval_key("zeroshot", name, limit=limit, num_fewshot=num_fewshot, definitions=definitions, dtype=dtype)


def keyed_zeroshot(rows: list[dict], limit: int | None, *, num_fewshot: int = 0,
                   include: TaskFolder | None = None) -> list[dict]:
    """Zero-shot rows with their `eval_key` (the store never mixes evaluations made differently).

    A row is keyed by the name asked for (`request`: a group's subtasks carry the group's key), so
    whether a requested name was evaluated is one key lookup; a task asked by name keeps the key it
    always had.
    """
    return [dict(r, eval_key=zeroshot_key(r.get("request", r["task"]), limit, num_fewshot=num_fewshot,
                                          include=include, dtype=r.get("dtype"))) for r in rows]


def recorded(run: dict) -> list[dict]:
    """Every evaluation a run.json holds (a run.json written before `evaluations` existed: its
    headline results, which were all it kept)."""
    if "evaluations" in run:
        return list(run["evaluations"])
    data = run.get("eval_data", {})
    entries = [perplexity_entry(n, v, data[n]) for n, v in run.get("perplexity", {}).items() if "eval_key" in data.get(n, {})]
    return entries + [dict(r, kind="zeroshot", protocol=f"{r.get('n_docs')} documents") for r in run.get("zeroshot", [])]


def missing(run: dict, *, perplexity_sets, seqlen, windows, zeroshot_tasks, limit, num_fewshot: int = 0,
            include: TaskFolder | None = None, dtype: str | None = None) -> tuple[list, list]:
    """The requested evaluations a run.json does not hold yet (made the same way, in compute `dtype`)."""
    from orchestrator.spec import eval_key

    entries = recorded(run)
    have = {(e["task"], e["eval_key"]) for e in entries}
    zeroshot_keys = {e["eval_key"] for e in entries if e["kind"] == "zeroshot"}
    ppl = [n for n in perplexity_sets
           if (n, eval_key("perplexity", n, seqlen=seqlen, windows=windows, dtype=dtype)) not in have]
    zs = [t for t in zeroshot_tasks
          if zeroshot_key(t, limit, num_fewshot=num_fewshot, include=include, dtype=dtype) not in zeroshot_keys]
    return ppl, zs


_INFO = ("origin", "windows", "windows_available", "tokens", "seqlen", "dtype", "eval_key")  # eval_data's fields


def _scored(entry: dict) -> int:
    """How much an evaluation scored: tokens for perplexity, documents for zero-shot."""
    if entry["kind"] == "perplexity":
        return entry["seqlen"] * entry["windows"]
    return entry.get("n_docs") or 0


def merge(run: dict, new: dict) -> dict:
    """`run` with the new evaluations added to `evaluations` (one per eval key, task and metric).

    The headline results (`perplexity`, `eval_data`, `zeroshot`) are, per dataset or task, the
    fullest evaluation on record (most tokens or documents scored; the newer on a tie): a quick
    look with fewer windows is kept beside the full one, never in its place.
    """
    ident = lambda e: (e["eval_key"], e["task"], e["metric"])  # noqa: E731
    fresh = {ident(e) for e in new["evaluations"]}
    entries = [e for e in recorded(run) if ident(e) not in fresh] + list(new["evaluations"])
    best: dict[tuple[str, str], dict] = {}
    for e in entries:  # later entries are newer: >= lets them win a tie
        key = (e["kind"], e["task"])
        if key not in best or _scored(e) >= _scored(best[key]):
            best[key] = e
    out = dict(run, evaluations=entries)
    ppl = {task: e for (kind, task), e in best.items() if kind == "perplexity"}
    out["perplexity"] = {task: e["value"] for task, e in ppl.items()}
    out["eval_data"] = {task: {k: v for k, v in e.items() if k in _INFO} for task, e in ppl.items()}
    keys = {task: e["eval_key"] for (kind, task), e in best.items() if kind == "zeroshot"}
    out["zeroshot"] = [{k: v for k, v in e.items() if k not in ("kind", "limit", "num_fewshot", "protocol")} for e in entries
                       if e["kind"] == "zeroshot" and keys.get(e["task"]) == e["eval_key"]]
    return out


def local_checkpoint(location: str) -> tuple[Path, object]:
    """A local folder holding the checkpoint at `location` (downloaded when it is a URI), and a cleanup."""
    if not fileio.is_uri(location):
        from neuroal.models import resolve_model

        return (Path(location) if Path(location).exists() else resolve_model(location)), None
    tmp = tempfile.TemporaryDirectory(prefix="neuroal-ckpt-")
    for name in fileio.listdir(location):
        if not name.startswith("_") and "." in name:
            fileio.get_file(fileio.join(location, name), Path(tmp.name) / name)
    return Path(tmp.name), tmp


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
    placement = getattr(session.chain, "placement", None)
    if placement is None:
        return zeroshot(location, tasks, data_dir, limit, num_fewshot=num_fewshot, include=include, dtype=dtype)
    session.release_devices()
    return zeroshot_on_ray(placement, session.chain.n_shards, location, tasks, data_dir, limit,
                           num_fewshot=num_fewshot, include=include, dtype=dtype)


def zeroshot_without_shards(location: str, tasks, data_dir, limit, *, executor: str, shards: int, device: str,
                            address: str | None, num_fewshot: int = 0, include: TaskFolder | None = None,
                            dtype: str = "auto") -> list[dict]:
    """Zero-shot when nothing else is evaluated: no shard actor loads the model only to hand its
    devices over; the Ray task gets what `shards` actors would hold (`place_shards`)."""
    if executor == "local":
        return zeroshot(location, tasks, data_dir, limit, device, num_fewshot=num_fewshot, include=include,
                        dtype=dtype)
    import ray

    from orchestrator.placement import place_shards
    from orchestrator.ray_chain import ensure_ray

    started = ensure_ray(address, os.cpu_count())
    try:
        return zeroshot_on_ray(place_shards(shards, device), shards, location, tasks, data_dir, limit,
                               num_fewshot=num_fewshot, include=include, dtype=dtype)
    finally:
        if started:
            ray.shutdown()


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
