"""The Python API: `prune`, `evaluate` and `plan`, on the CLI's own code path.

Keyword arguments are named like the flags (`--top-up` → `top_up`); bad values raise the same
one-line `NeuroalError` the CLI prints. `prune` and `evaluate` return a `RunRecord`.

    from orchestrator import prune
    run = prune(model="smollm2-135m", method="wanda", top_up="neuroal", sparsity=0.7,
                seqlen=256, nsamples=32, eval="wikitext2", out="runs/smol-0.7")
    run.lambda_block, run.sparsity_actual, run.perplexity["wikitext2"]
    model = run.load_model()
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from neuroal import fileio
from neuroal.errors import NeuroalError, SpecError
from orchestrator.results.record import RunRecord


def prune(model: str = "smollm2-135m", *, overwrite: bool = False, store: bool | str | Path = True,
          progress=None, **flags) -> RunRecord:
    """Prune `model` and write its run folder; the flags of `neuroal prune` as keyword arguments.

    Args:
        overwrite: redo a finished run in `out`.
        store: append the results rows to the default store (True), to this folder, or not (False).
        progress: called with run events (`orchestrator.pruning.job.prune`), e.g. for a notebook progress bar.
        **flags: `method`, `top_up` (a built-in name, or `package.module:object` of your own installed
            package: `neuroal.plugins`), `sparsity`, `pattern`, `calibration`, `nsamples`, `seqlen`, `eval`,
            `zeroshot`, `out`, `shards`, `executor`, `address` (default `$RAY_ADDRESS`), ... (`PruneSpec`).

    Returns:
        The run's record (chosen λs, curves, sparsity, evaluations, timings, `load_model()`).

    Raises:
        NeuroalError: a bad value or an unusable input, in one line naming the flag.
    """
    from orchestrator.pruning.job import prune as prune_spec
    from orchestrator.spec import build_spec

    flags.setdefault("address", os.environ.get("RAY_ADDRESS"))
    spec = build_spec(model=model, **flags)
    kw = {} if progress is None else {"progress": progress}
    return prune_spec(spec, overwrite=overwrite, store=store, **kw)


def evaluate(model: str, *, eval=(), zeroshot=(), seqlen: int | None = None, eval_windows: int | None = None,
             zeroshot_limit: int | None = None, zeroshot_include: str | None = None, num_fewshot: int = 0,
             data_dir: str | None = None, shards: int = 1, executor: str = "auto", address: str | None = None,
             dtype: str = "auto", device: str = "auto", store: bool | str | Path = True) -> RunRecord:
    """Evaluate a run folder (its run.json gains the results), a checkpoint folder or a hub id; the
    flags of `neuroal eval` as keyword arguments. `seqlen` defaults to the run's, else 2048.

    Raises:
        NeuroalError: a bad value, nothing to evaluate, or an unusable input.
    """
    from orchestrator.evaluation.jobs import evaluate_model
    from orchestrator.results.run_folder import read_run
    from orchestrator.spec import build_spec
    from orchestrator.results.store import append_run_rows, store_dir

    address = address or os.environ.get("RAY_ADDRESS")
    checked = build_spec(eval=eval, zeroshot=zeroshot, shards=shards, executor=executor, address=address, dtype=dtype,
                         device=device,
                         eval_windows=eval_windows, zeroshot_limit=zeroshot_limit, zeroshot_include=zeroshot_include,
                         num_fewshot=num_fewshot, **({} if seqlen is None else {"seqlen": seqlen}))
    if not checked.eval and not checked.zeroshot:
        raise NeuroalError("--eval/--zeroshot: nothing to evaluate; give at least one dataset or task")
    fileio.check_access(model, "--model")  # a storage URI this process cannot reach: one line, before any work
    if store is not False:
        fileio.check_folder(store_dir(None if store is True else store), "--store")
    if seqlen is None:
        previous = read_run(model)
        seqlen = previous["spec"]["seqlen"] if previous else 2048
    run = evaluate_model(model, perplexity_sets=checked.eval, seqlen=seqlen, windows=eval_windows,
                         zeroshot_tasks=checked.zeroshot, limit=zeroshot_limit, num_fewshot=checked.num_fewshot,
                         zeroshot_include=checked.zeroshot_include, data_dir=data_dir, executor=checked.executor,
                         shards=shards, dtype=dtype, device=device, address=address)
    record = RunRecord.from_json(run)
    if store is not False:
        append_run_rows(record, None if store is True else store)
    return record


@dataclass(frozen=True)
class PlanResult:
    """A shard plan: resident (`plan`), or offloaded with a projected time (`offloaded`, `passes`)."""

    payload: dict  # what `neuroal plan --json` writes
    plan: object | None = None  # orchestrator.planning.Plan, when the blocks fit
    offloaded: object | None = None  # orchestrator.planning.offloaded.OffloadedPlan, when they do not
    passes: list = field(default_factory=list)  # projected passes of the offloaded prune
    projection_method: str = ""

    def tables(self, method: str) -> list:
        """The rich tables `neuroal plan` prints."""
        from orchestrator.planning import render_plan
        from orchestrator.planning.render import render_offloaded

        if self.plan is not None:
            return [render_plan(self.plan)]
        return list(render_offloaded(self.offloaded, self.passes, method, self.projection_method))


def plan(model: str = "smollm2-135m", *, gpus: int | None = None, gpu_mem: str = "80GB", dtype: str = "bfloat16",
         method: str = "wanda", streams: int = 2, seqlen: int = 2048, nsamples: int = 128, sparsity: float = 0.5,
         offload: str = "auto", tflops: float | None = None, h2d_gbps: float | None = None,
         disk_gbps: float | None = None) -> PlanResult:
    """Plan shards for `model` without loading weights; the flags of `neuroal plan` as keyword arguments.

    When the blocks do not fit the GPUs (or `offload` is "cpu"/"disk") the plan is offloaded, with
    each actor's device, host and disk need and a projected time of the prune (assumed rates:
    `orchestrator.planning.cost`).
    """
    from neuroal.allocation.neuroal import steps
    from neuroal.families import family_for
    from neuroal.methods import METHODS
    from orchestrator.planning import load_plan_config, parse_bytes, plan_shards
    from orchestrator.planning.cost import (ASSUMED_DISK_GBPS, ASSUMED_H2D_GBPS, ASSUMED_TFLOPS, method_line,
                                            projected_passes)
    from orchestrator.planning.layout import measure_model
    from orchestrator.planning.offloaded import plan_offloaded, resident_or_offloaded
    from orchestrator.planning.sizes import DTYPE_BYTES, canonical_dtype
    from orchestrator.spec import OFFLOAD_CHOICES, check_sparsity

    for flag, value in (("--gpus", gpus), ("--streams", streams)):
        if value is not None and value < 1:
            raise SpecError(flag, value, "a positive integer")
    if offload not in OFFLOAD_CHOICES:
        raise SpecError("--offload", offload, OFFLOAD_CHOICES)
    check_sparsity(sparsity, "--sparsity")
    tflops = ASSUMED_TFLOPS if tflops is None else tflops
    h2d_gbps = ASSUMED_H2D_GBPS if h2d_gbps is None else h2d_gbps
    disk_gbps = ASSUMED_DISK_GBPS if disk_gbps is None else disk_gbps
    cfg = load_plan_config(model)
    mem = parse_bytes(gpu_mem)
    def resident():
        return plan_shards(cfg, n_actors=gpus, mem_per_actor=mem, dtype=dtype, method=method,
                           streams_in_flight=streams, seqlen=seqlen, nsamples=nsamples)

    p, mode, reason = resident_or_offloaded(offload, resident, f"--gpu-mem {gpu_mem}")
    if mode is None:
        return PlanResult(payload=p.to_dict(), plan=p)
    op = plan_offloaded(cfg, n_actors=gpus, mem_per_actor=mem, mode=mode, dtype=dtype, method=method,
                        nsamples=nsamples, seqlen=seqlen, reason=reason)
    passes = projected_passes(measure_model(cfg), dtype_bytes=DTYPE_BYTES[canonical_dtype(dtype)], seqlen=seqlen,
                              search_windows=op.plan.stream_windows, nsamples=nsamples, mode=mode, tflops=tflops,
                              h2d_gbps=h2d_gbps, disk_gbps=disk_gbps,
                              row_step=steps("both", METHODS.get(method), family_for(cfg)).row, sparsity=sparsity)
    how = method_line(tflops=tflops, h2d_gbps=h2d_gbps, disk_gbps=disk_gbps, mode=mode)
    payload = {**op.to_dict(), "projected_passes": [{**vars(x), "seconds": x.seconds} for x in passes],
               "projection_method": how}
    return PlanResult(payload=payload, offloaded=op, passes=passes, projection_method=how)
