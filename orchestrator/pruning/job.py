"""Prune one spec, end to end: the one module the CLI and the grid both call.

spec → (config edge: allocator, refiner, prune options) → session of shards → calibration →
allocation (the allocator's evidence, collected generically; λ chosen in `neuroal.allocation`) →
final pass → checkpoint → evaluation → run folder (`run.json`, plots) and results rows.

A run folder is written in a temporary sibling and renamed into place; a rerun of a finished spec
returns it, and an interrupted run resumes from its shards' checkpoints and the saved allocation.
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from neuroal import __version__
from neuroal.allocation import ALLOCATORS, Allocation, AllocationProblem, Allocator
from neuroal.block import PruneOptions
from neuroal.data import DATA_VERSION, calibration_windows, resolve_data_dir
from neuroal.errors import NeuroalError, SpecError
from neuroal.families import family_for
from neuroal import fileio
from neuroal.methods import METHODS, parse_pattern
from neuroal.models import load_config, load_tokenizer, resolve_model
from neuroal.plugins import plugin_names
from neuroal.refiners import REFINERS
from neuroal.stats import ExpertRule
from orchestrator.chain.executors import executor_for
from orchestrator.chain.session import Session, check_pattern, check_positions, open_session
from orchestrator.chain.streams import run_stream
from orchestrator.evaluation.jobs import complete_evaluations, evaluate
from orchestrator.evaluation.zeroshot import task_folder
from orchestrator.pruning.evidence import collect
from orchestrator.pruning.resume import restore_allocation, save_allocation
from orchestrator.results.record import RunRecord
from orchestrator.pruning.checkpoint import save_checkpoint
from orchestrator.results.run_folder import RunOutput
from orchestrator.spec import GRID_VERSION, PruneSpec
from orchestrator.chain.passes import Prune

logger = logging.getLogger(__name__)

Progress = Callable[..., None]


def _noop(*_a, **_k):
    return None


# ---------------------------------------------------------------- the config edge


def allocator_for(spec: PruneSpec) -> Allocator:
    return ALLOCATORS.get(spec.top_up).from_fields(spec.model_dump())


def prune_options(spec: PruneSpec) -> PruneOptions:
    """How every linear is pruned: the method, its knobs, and the top-up's refiner if it has one."""
    name = ALLOCATORS.get(spec.top_up).refiner
    return PruneOptions(
        method=spec.method,
        pattern=parse_pattern(spec.pattern),
        granularity=spec.granularity,
        blocksize=spec.blocksize,
        percdamp=spec.percdamp,
        refiner=REFINERS.get(name).from_fields(spec.model_dump()) if name else None,
        max_tokens=spec.max_tokens,
        experts=ExpertRule(calibrate_all=spec.moe_calibrate_all_experts, min_tokens=spec.moe_min_tokens),
    )


def session_for(spec: PruneSpec, *, resume_dir: Path | None = None) -> Session:
    session = open_session(spec.model, executor=spec.executor, shards=spec.shards, dtype=spec.dtype,
                           device=spec.device, address=spec.address, gpu_mem=spec.gpu_mem, offload=spec.offload, method=spec.method,
                           stream_windows=spec.search_windows, seqlen=spec.seqlen, nsamples=spec.nsamples,
                           resume_dir=resume_dir)
    try:
        check_pattern(session.shapes, parse_pattern(spec.pattern), spec.pattern)
        plugins = plugin_names(spec.method, spec.top_up)
        if plugins:  # shard actors: each imports them where it runs
            session.chain.check_plugins(plugins)
    except NeuroalError:
        session.close()
        raise
    return session


def check_memory(spec: PruneSpec, config) -> None:
    """Refuse, up front, a final pass whose hidden states cannot fit this machine's free memory.

    The final pass holds every calibration window's hidden states twice (a block's input and output).
    Checked where that memory is this machine's (in process, or an embedded Ray instance); on a cluster
    the actors' nodes hold it.
    """
    if not executor_for(spec.executor, spec.address).memory_is_here:
        return
    import psutil

    from neuroal.devices import resolve_dtype

    hidden = int(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size", 0))
    e = torch.tensor([], dtype=resolve_dtype(spec.dtype, torch.device("cpu"))).element_size()
    need = 2 * spec.nsamples * spec.seqlen * hidden * e
    free = psutil.virtual_memory().available
    if hidden and need > free:
        fits = free // (2 * spec.seqlen * hidden * e)
        raise SpecError("--nsamples", spec.nsamples, f"at most {fits} with --seqlen {spec.seqlen}: the final pass holds "
                        f"2 x nsamples x seqlen x hidden ({hidden}) x {e} bytes = {need / 1e9:.1f} GB, and this machine "
                        f"has {free / 1e9:.1f} GB free")


def check_services(spec: PruneSpec, store: bool | str | Path = True) -> None:
    """Where results go can take them, and the storage URIs and the Ray cluster the run needs answer:
    checked before anything is read or written.

    Raises:
        NeuroalError: `--out` or `--store` is a file or cannot be created.
        StorageAccessError: `--out`, `--store` or `--model` is a URI this process cannot reach.
        RayUnavailable: `--address` names a Ray cluster that does not answer.
    """
    fileio.check_folder(spec.out or spec.default_out(), "--out")
    if store is not False:
        from orchestrator.results.store import store_dir

        fileio.check_folder(store_dir(None if store is True else store), "--store")
    fileio.check_access(spec.model, "--model")
    executor_for(spec.executor, spec.address).check_reachable()


def preflight(spec: PruneSpec) -> tuple[torch.Tensor, str]:
    """The up-front checks and the calibration tokens, before any actor starts or anything is written."""
    model_dir = resolve_model(spec.model, weights=False)
    config = load_config(model_dir)
    family_for(config)  # an unsupported architecture fails here
    check_positions(config, spec.seqlen)
    check_memory(spec, config)
    return calibration_windows(spec.calibration, load_tokenizer(model_dir), spec.nsamples, spec.seqlen, spec.seed,
                               resolve_data_dir(spec.data_dir))


# ---------------------------------------------------------------- the stages


def allocate(spec: PruneSpec, session: Session, calib, opts: PruneOptions, progress: Progress = _noop) -> Allocation:
    """The top-up's ratios: its declared evidence, collected on the shards, turned into ratios."""
    allocator = allocator_for(spec)
    problem = AllocationProblem(session.n_blocks, session.family.linears, session.shapes, spec.effective_sparsity,
                                session.family, METHODS.get(spec.method))
    evidence = collect(allocator, session, calib, opts, early_stop=spec.early_stop,
                       on_candidate=lambda step, lam, score: progress("candidate", step=step, lam=lam, outcome=score))
    return allocator.allocate(problem, evidence)


def final_prune(session: Session, calib, ratios, opts: PruneOptions) -> dict[int, object]:
    """Stream the calibration windows through the shards, each pruning its blocks in place."""
    hidden = session.embed(calib) if opts.needs else None
    runs = run_stream(session.chain, lambda i: Prune(session.ratios_of(i, ratios), opts), hidden)[1]
    return {b: rec for run in runs for b, rec in run.records.items()}


def sparsity_report(records: dict, shapes) -> dict:
    """Actual sparsity over the prunable linears, per layer, and a per-row summary."""
    total = zeros = 0.0
    layers, rows = {}, {}
    for b in sorted(records):
        rec = records[b]
        for name, frac in rec.sparsity.items():
            n = shapes[name][0] * shapes[name][1]
            total += n
            zeros += frac * n
            layers[f"{b}.{name}"] = round(frac, 6)
            r = rec.row_sparsity.get(name)
            if r is not None:
                rows[f"{b}.{name}"] = {"min": round(float(r.min()), 6), "max": round(float(r.max()), 6),
                                       "std": round(float(r.std()), 6)}
    return {"sparsity_actual": zeros / total, "layer_sparsity": layers, "row_sparsity": rows}


def moe_report(records: dict, rule: ExpertRule) -> dict:
    """How each block's experts were calibrated in the final pass (mixture-of-experts models only)."""
    blocks = {str(b): {path: {"routed_tokens": list(c.routed_tokens), "all_tokens": list(c.all_tokens), "rule": c.rule}
                       for path, c in rec.experts.items()} for b, rec in sorted(records.items()) if rec.experts}
    if not blocks:
        return {}
    starved = sum(len(m["all_tokens"]) for blk in blocks.values() for m in blk.values())
    return {"moe_calibration": {"calibrate_all_experts": rule.calibrate_all, "min_tokens": rule.min_tokens,
                                "experts_on_all_tokens": starved, "blocks": blocks}}


def versions() -> dict:
    import importlib.metadata as md

    out = {"neuroal": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "lm_eval", "datasets", "safetensors", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _restore_or_allocate(spec, session, calib, opts, progress, resume_dir: str | None) -> Allocation:
    """The allocation saved by an interrupted attempt (`orchestrator.pruning.resume`), or a new one, then saved."""
    if resume_dir is not None:
        alloc = restore_allocation(str(resume_dir), spec.cell_key(), session.n_blocks, session.family.linears)
        if alloc is not None:
            return alloc
    alloc = allocate(spec, session, calib, opts, progress)
    if resume_dir is not None:
        save_allocation(str(resume_dir), alloc, spec.cell_key())
    return alloc


def execute(spec: PruneSpec, out_dir: str | Path, *, session: Session | None = None, progress: Progress = _noop,
            resume_dir: str | Path | None = None, calibration: tuple[torch.Tensor, str] | None = None) -> dict:
    """Run a prune into `out_dir` (a fresh local folder, or a URI); returns the run.json content.

    Args:
        session: an open session to prune (left open); None opens one for this call.
        calibration: the calibration windows and their origin (`preflight`); None computes them.
    """
    if session is None:
        session = session_for(spec, resume_dir=resume_dir)
        try:
            return execute(spec, out_dir, session=session, progress=progress, resume_dir=resume_dir,
                           calibration=calibration)
        finally:
            session.close()
    timings: dict[str, float] = {}
    data_dir = resolve_data_dir(spec.data_dir)
    opts = prune_options(spec)
    t = time.perf_counter()
    calib, calib_origin = calibration or calibration_windows(spec.calibration, session.tokenizer, spec.nsamples,
                                                             spec.seqlen, spec.seed, data_dir)
    timings["calibration"] = time.perf_counter() - t

    def timed(phase: str, fn, *args, **kw):
        progress("phase", name=phase)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            timings[phase] = time.perf_counter() - t0

    def evals(location=None, zeroshot=(), times=None):
        return evaluate(session, location, perplexity_sets=spec.eval, seqlen=spec.seqlen, windows=spec.eval_windows,
                        zeroshot_tasks=zeroshot, limit=spec.zeroshot_limit, data_dir=data_dir, timings=times,
                        num_fewshot=spec.num_fewshot,
                        include=task_folder(spec.zeroshot_include) if zeroshot else None)

    ppl_dense = timed("eval_dense", evals)["perplexity"] if spec.eval_dense else {}
    alloc = timed("allocation", _restore_or_allocate, spec, session, calib, opts, progress, resume_dir)
    timings.update(alloc.extra.pop("timings_s", {}))
    records = timed("prune", final_prune, session, calib, alloc.ratios, opts)
    direct = fileio.is_uri(out_dir) or session.chain.in_process  # else a Ray actor may be on another machine
    timed("save", save_checkpoint, session, str(out_dir), direct=direct)
    progress("phase", name="eval")
    results = evals(str(out_dir), spec.zeroshot, timings)
    block_mean = [float(np.mean([np.mean(alloc.ratios[b][n]) for n in session.family.linears]))
                  for b in range(session.n_blocks)]
    moe = moe_report(records, opts.experts)
    starved = moe.get("moe_calibration", {}).get("experts_on_all_tokens", 0)
    notes = alloc.notes + ([f"{starved} expert(s) routed fewer than {opts.experts.min_tokens} calibration token(s) in a "
                            "block were calibrated on all of the block's tokens"] if starved and not opts.experts.calibrate_all else [])
    return {
        "spec": spec.model_dump(mode="json"),
        "cell_key": spec.cell_key(),
        "family": session.family.name,
        "model_dir": str(session.model_dir),
        "n_blocks": session.n_blocks,
        "shards": [[s.first_block, s.end_block - 1] for s in session.shard_specs],
        "lambda_block": alloc.lambda_block,
        "lambda_row": alloc.lambda_row,
        "lambda_curves": alloc.curves,
        "neuroal_step_run": alloc.step_run,
        "notes": notes,
        "block_sparsity_planned": block_mean,
        "sparsity_target": spec.effective_sparsity,
        **sparsity_report(records, session.shapes),
        **moe,
        "perplexity": results["perplexity"],
        "perplexity_dense": ppl_dense,
        "zeroshot": results["zeroshot"],
        "eval_data": results["eval_data"],
        "evaluations": results["evaluations"],  # every evaluation with its protocol (the headlines above: the fullest)
        "calibration": {"origin": calib_origin, "windows": int(calib.shape[0]), "seqlen": int(calib.shape[1])},
        "allocation_extra": alloc.extra,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "plugins": spec.plugins(),  # {distribution: version} of a plug-in method or top-up
        "data_version": DATA_VERSION,
        "grid_version": GRID_VERSION,
        "host": platform.node(),
    }


# ---------------------------------------------------------------- one prune, with its run folder


def prune(spec: PruneSpec, *, overwrite: bool = False, store: bool | str | Path = True,
          progress: Progress = _noop) -> RunRecord:
    """Prune `spec` into its out folder (a finished identical run is returned as it is); returns the
    run's record, from which its run.json and results rows are written.

    Args:
        store: append the results rows to the default store (True), to this folder, or not (False).
        progress: receives events: ("resumed", out=), ("open", n_blocks=), ("phase", name=),
            ("block", kind=, block=) from in-process shards, ("candidate", step=, lam=, outcome=).
    """
    check_services(spec, store)
    output = RunOutput(spec.out or spec.default_out(), spec.cell_key())
    previous = output.previous()
    if previous is not None and not overwrite:
        progress("resumed", out=output.out)
        run, changed = complete_evaluations(previous, output.out, perplexity_sets=spec.eval, seqlen=spec.seqlen,
                                            windows=spec.eval_windows, zeroshot_tasks=spec.zeroshot,
                                            limit=spec.zeroshot_limit, data_dir=spec.data_dir, executor=spec.executor,
                                            shards=spec.shards, dtype=spec.dtype, device=spec.device,
                                            address=spec.address, num_fewshot=spec.num_fewshot,
                                            zeroshot_include=spec.zeroshot_include)
        record = RunRecord.from_json(run)
        if changed and store is not False:
            from orchestrator.results.store import append_run_rows

            append_run_rows(record, None if store is True else store)
        return record
    output.check_free(overwrite)
    calibration = preflight(spec)
    session = session_for(spec, resume_dir=output.resume_location)
    try:
        progress("open", n_blocks=session.n_blocks)
        session.chain.set_progress(lambda kind, b: progress("block", kind=kind, block=b))
        with output.writing(overwrite) as location:
            run = execute(spec, location, session=session, progress=progress, resume_dir=output.resume_location,
                          calibration=calibration)
            run["out"] = output.out
            run["shard_reports"] = session.shard_reports()
            run["recoveries"] = session.chain.recoveries  # actors restarted and replayed
            if session.offload is not None:
                run["offload"] = {"mode": session.offload.mode, "why": session.offload.why,
                                  "shards": [r["offload"] for r in run["shard_reports"]]}
            record = RunRecord.from_json(run)
            with tempfile.TemporaryDirectory() as tmp:
                from orchestrator.results.plots import run_plots

                run_plots(record, Path(tmp))
                output.put_local_folder(Path(tmp), location)
            output.finish(location, record.to_json())
    finally:
        session.close()
    if store is not False:
        from orchestrator.results.store import append_run_rows

        append_run_rows(record, None if store is True else store)
    return record
