"""Evaluation jobs: an open session's model (`evaluate`, after a prune), a finished run that lacks requested
metrics, or any model (`neuroal eval`).

A pruned model's identity (`cell_key`) and an evaluation's (`eval_key`) are separate keys, so a prune
rerun whose evaluation request differs keeps the pruned checkpoint and computes only what is missing,
and never reports a metric it did not compute. Results go to the run folder's run.json (rewritten
atomically, or one PUT on an object store) and to the results store, like a prune's.
"""

from __future__ import annotations

import logging
import platform
import time

from neuroal import fileio
from neuroal.data import DATA_VERSION, resolve_data_dir
from neuroal.zeroshot import TaskFolder
from orchestrator.chain.session import Session, compute_dtype, open_session
from orchestrator.evaluation import perplexity, zeroshot
from orchestrator.evaluation.zeroshot import task_folder
from orchestrator.results.evaluations import keyed_zeroshot, merge, missing, perplexity_entry, zeroshot_entries
from orchestrator.results.run_folder import RUN_JSON, read_run, to_json
from orchestrator.spec import GRID_VERSION, dense_key

logger = logging.getLogger(__name__)


def evaluate(session: Session, location: str, *, perplexity_sets=(), seqlen: int, windows: int | None = None,
             zeroshot_tasks=(), limit: int | None = None, data_dir=None, timings: dict | None = None,
             num_fewshot: int = 0, include: TaskFolder | None = None) -> dict:
    """Perplexities through the session's shards and zero-shot tasks on the checkpoint at `location`.

    Returns {"perplexity": {name: value}, "eval_data": {name: info}, "zeroshot": [rows],
    "evaluations": [entries]}, each result carrying its `eval_key` and protocol, so a store never mixes
    evaluations made differently. Zero-shot comes last: on Ray it releases the shard actors
    (`zeroshot_where_the_gpus_are`).
    """
    from orchestrator.spec import eval_key

    timings = {} if timings is None else timings
    out = {"perplexity": {}, "eval_data": {}, "zeroshot": [], "evaluations": []}
    t = time.perf_counter()
    for name in perplexity_sets:
        value, info = perplexity.perplexity(session, name, seqlen, data_dir, max_windows=windows)
        out["perplexity"][name] = value
        out["eval_data"][name] = dict(info, seqlen=seqlen, dtype=session.dtype,
                                      eval_key=eval_key("perplexity", name, seqlen=seqlen, windows=windows,
                                                        dtype=session.dtype))
        out["evaluations"].append(perplexity_entry(name, value, out["eval_data"][name]))
    timings["eval"] = timings.get("eval", 0.0) + time.perf_counter() - t
    if zeroshot_tasks:
        t = time.perf_counter()
        rows = zeroshot.zeroshot_where_the_gpus_are(session, location, list(zeroshot_tasks), data_dir, limit,
                                                   num_fewshot=num_fewshot, include=include, dtype=session.dtype)
        out["zeroshot"] = keyed_zeroshot(rows, limit, num_fewshot=num_fewshot, include=include)
        out["evaluations"] += zeroshot_entries(out["zeroshot"], limit, num_fewshot=num_fewshot)
        timings["zeroshot"] = timings.get("zeroshot", 0.0) + time.perf_counter() - t
    return out


def open_evaluation_session(location: str, *, executor: str, shards: int, dtype: str, device: str,
                            address: str | None, seqlen: int):
    """The model as a chain of shards for evaluation only: every pass ends in the lm head, so the
    shard plan counts the head in the last shard's pace (`plan_shards(head_runs=True)`)."""
    return open_session(location, executor=executor, shards=shards, dtype=dtype, device=device, address=address,
                        seqlen=seqlen, head_runs=True)


def _evaluate(location: str, *, perplexity_sets, seqlen: int, windows, zeroshot_tasks, limit, data_dir,
              timings: dict, executor: str, shards: int, dtype: str, device: str, address: str | None,
              num_fewshot: int = 0, include: TaskFolder | None = None) -> dict:
    """Perplexity through shards opened for it (zero-shot after, with their devices); zero-shot
    alone opens no shards."""
    if perplexity_sets:
        session = open_evaluation_session(location, executor=executor, shards=shards, dtype=dtype, device=device,
                                          address=address, seqlen=seqlen)
        try:
            return evaluate(session, location, perplexity_sets=perplexity_sets, seqlen=seqlen, windows=windows,
                            zeroshot_tasks=zeroshot_tasks, limit=limit, data_dir=data_dir, timings=timings,
                            num_fewshot=num_fewshot, include=include)
        finally:
            session.close()
    t = time.perf_counter()
    rows = zeroshot.zeroshot_without_shards(location, list(zeroshot_tasks), data_dir, limit, executor=executor,
                                            shards=shards, device=device, address=address, num_fewshot=num_fewshot,
                                            include=include, dtype=dtype)
    timings["zeroshot"] = time.perf_counter() - t
    keyed = keyed_zeroshot(rows, limit, num_fewshot=num_fewshot, include=include)
    return {"perplexity": {}, "eval_data": {}, "zeroshot": keyed,
            "evaluations": zeroshot_entries(keyed, limit, num_fewshot=num_fewshot)}


def complete_evaluations(run: dict, location: str, *, perplexity_sets=(), seqlen: int, windows: int | None,
                         zeroshot_tasks=(), limit: int | None, data_dir=None, executor: str = "ray",
                         shards: int = 1, dtype: str = "auto", device: str = "auto",
                         address: str | None = None, num_fewshot: int = 0,
                         zeroshot_include: str | None = None) -> tuple[dict, bool]:
    """`run` (the run.json at `location`) with the requested evaluations it lacks; (run, changed)."""
    include = task_folder(zeroshot_include) if zeroshot_tasks else None
    want = compute_dtype(dtype, device, executor, address)  # an fp32 request is not answered by a bf16 record
    ppl, zs = missing(run, perplexity_sets=perplexity_sets, seqlen=seqlen, windows=windows,
                      zeroshot_tasks=zeroshot_tasks, limit=limit, num_fewshot=num_fewshot, include=include, dtype=want)
    if not ppl and not zs:
        return run, False
    logger.info("%s: computing %s (the pruned checkpoint is kept)", location, ", ".join(ppl + zs))
    timings: dict[str, float] = {}
    new = _evaluate(location, perplexity_sets=ppl, seqlen=seqlen, windows=windows, zeroshot_tasks=zs, limit=limit,
                    data_dir=resolve_data_dir(data_dir), timings=timings, executor=executor, shards=shards,
                    dtype=dtype, device=device, address=address, num_fewshot=num_fewshot, include=include)
    merged = merge(run, new)
    merged["timings_s"] = {**run.get("timings_s", {}), **{f"re{k}": round(v, 3) for k, v in timings.items()}}
    fileio.write_text(fileio.join(location, RUN_JSON), to_json(merged))
    return merged, True


def evaluate_model(model: str, *, perplexity_sets=(), seqlen: int = 2048, windows: int | None = None,
                   zeroshot_tasks=(), limit: int | None = None, data_dir=None, executor: str = "ray", shards: int = 1,
                   dtype: str = "auto", device: str = "auto", address: str | None = None, num_fewshot: int = 0,
                   zeroshot_include: str | None = None) -> dict:
    """Evaluate a run folder (its run.json gains the metrics) or any model (a hub id, a checkpoint).

    Returns a run.json-shaped record; for a model that is not a run folder its `cell_key` is
    `dense_key(model)` and its method "dense", so the store and the report show it as the dense row.
    """
    previous = read_run(model)
    if previous is not None:
        run, _ = complete_evaluations(previous, model, perplexity_sets=perplexity_sets, seqlen=seqlen,
                                      windows=windows, zeroshot_tasks=zeroshot_tasks, limit=limit,
                                      data_dir=data_dir, executor=executor, shards=shards, dtype=dtype,
                                      device=device, address=address, num_fewshot=num_fewshot,
                                      zeroshot_include=zeroshot_include)
        return run
    dense = {"spec": {"model": model, "method": "dense", "top_up": "none", "pattern": "dense", "seed": 0,
                      "calibration": "", "seqlen": seqlen},
             "cell_key": dense_key(model), "sparsity_target": 0.0, "sparsity_actual": 0.0, "timings_s": {},
             "lambda_block": None, "lambda_row": None, "data_version": DATA_VERSION, "grid_version": GRID_VERSION,
             "host": platform.node(), "out": None}
    timings: dict[str, float] = {}
    t = time.perf_counter()
    new = _evaluate(model, perplexity_sets=list(perplexity_sets), seqlen=seqlen, windows=windows,
                    zeroshot_tasks=zeroshot_tasks, limit=limit, data_dir=resolve_data_dir(data_dir), timings=timings,
                    executor=executor, shards=shards, dtype=dtype, device=device, address=address,
                    num_fewshot=num_fewshot, include=task_folder(zeroshot_include) if zeroshot_tasks else None)
    timings["total"] = time.perf_counter() - t
    return {**merge(dense, new), "timings_s": {k: round(v, 3) for k, v in timings.items()}}
