"""One prune, end to end: spec → calibration → shards → allocation → final pass → save → evaluate.

The same code drives one in-process shard (`LocalChain`) or N Ray actors (`RayChain`).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neuroal import __version__
from neuroal.allocation import TOPUPS
from neuroal.allocation import ratios as R
from neuroal.allocation.schedule import owl_block_sparsity
from neuroal.block import DSnoTOptions, PruneOptions
from neuroal.data import calibration_windows, perplexity_tokens, perplexity_windows, resolve_data_dir
from neuroal.errors import SpecError
from neuroal.families import Family, family_for
from neuroal.methods import parse_pattern
from neuroal.models import load_config, load_tokenizer, resolve_model
from orchestrator.pipeline import LocalChain, run_stream
from orchestrator.search import NeuroALSearch
from orchestrator.shard import Shard, ShardSpec, StreamTask
from orchestrator.spec import PruneSpec

logger = logging.getLogger(__name__)

Progress = Callable[..., None]


def _noop(*_a, **_k):
    return None


def even_shards(n_blocks: int, n_shards: int) -> list[ShardSpec]:
    """Contiguous, near-equal block ranges (blocks of one model have equal size)."""
    if not 1 <= n_shards <= n_blocks:
        raise SpecError("--shards", n_shards, f"1..{n_blocks} (the model has {n_blocks} blocks)")
    bounds = np.linspace(0, n_blocks, n_shards + 1).round().astype(int)
    return [
        ShardSpec(i, n_shards, int(bounds[i]), int(bounds[i + 1]), i == 0, i == n_shards - 1) for i in range(n_shards)
    ]


def planned_shards(config, spec: PruneSpec) -> list[ShardSpec]:
    """Contiguous shards balanced by parameter bytes (orchestrator.plan), checked against --gpu-mem."""
    from orchestrator.plan import parse_bytes, plan_shards

    n_blocks = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    if not 1 <= spec.shards <= n_blocks:
        raise SpecError("--shards", spec.shards, f"1..{n_blocks} (the model has {n_blocks} blocks)")
    plan = plan_shards(config, n_actors=spec.shards, mem_per_actor=parse_bytes(spec.gpu_mem) if spec.gpu_mem else 2**60,
                       dtype=spec.dtype, method=spec.method, stream_windows=spec.search_windows,
                       seqlen=spec.seqlen)
    n = plan.n_actors
    return [ShardSpec(s.index, n, s.first_block, s.end_block, s.has_embeddings, s.has_head) for s in plan.shards]


@dataclass
class Session:
    """A model opened as a chain of shards, with what the driver needs to know about it."""

    spec: PruneSpec
    model_dir: Path
    config: object
    family: Family
    tokenizer: object
    shard_specs: list[ShardSpec]
    chain: object
    shapes: dict[str, tuple[int, int]]
    kwargs_ready: set[int] = field(default_factory=set)

    @property
    def n_blocks(self) -> int:
        return self.shard_specs[-1].end_block

    @property
    def parallel(self) -> bool:
        return getattr(self.chain, "parallel", False)

    def ensure_kwargs(self, seqlen: int) -> None:
        """Capture the block kwargs for `seqlen` on the first shard and hand them to every shard."""
        if seqlen in self.kwargs_ready:
            return
        kwargs = self.chain.get(self.chain.call(0, "block_kwargs", seqlen))
        for i in range(self.chain.n_shards):
            self.chain.get(self.chain.call(i, "set_block_kwargs", seqlen, kwargs))
        self.kwargs_ready.add(seqlen)

    def embed(self, ids: torch.Tensor):
        self.ensure_kwargs(ids.shape[1])
        return self.chain.call(0, "embed", ids)

    def close(self) -> None:
        close = getattr(self.chain, "close", None)
        if close:
            close()


def open_session(
    spec: PruneSpec, shard_specs: list[ShardSpec] | None = None, *, resume_dir: Path | None = None
) -> Session:
    """Open the model as a chain of shards (in-process or Ray actors).

    Args:
        resume_dir: where shards checkpoint their pruned blocks; a restarted actor or a rerun
            restores them instead of pruning again.
    """
    model_dir = resolve_model(spec.model)
    config = load_config(model_dir)
    family = family_for(config)
    n_blocks = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    shard_specs = shard_specs or planned_shards(config, spec)
    if spec.executor == "local":
        shards = [Shard(model_dir, s, dtype=spec.dtype, device=spec.device, resume_dir=resume_dir) for s in shard_specs]
        chain = LocalChain(shards)
        shapes = shards[0].shapes
    else:
        from orchestrator.ray_chain import RayChain

        # actors resolve the model themselves: a hub id or the default downloads/converts per node
        model_ref = spec.model if not Path(spec.model).expanduser().exists() else model_dir
        chain = RayChain(model_ref, shard_specs, dtype=spec.dtype, device=spec.device, address=spec.address,
                         resume_dir=resume_dir)
        shapes = chain.get(chain.call(0, "get_shapes"))
    session = Session(spec, model_dir, config, family, load_tokenizer(model_dir), shard_specs, chain, shapes)
    pattern = parse_pattern(spec.pattern)
    if pattern is not None:
        bad = [f"{n} ({i})" for n, (_, i) in shapes.items() if i % pattern.m]
        if bad:
            session.close()
            raise SpecError("--pattern", spec.pattern, f"N:M with M dividing every input width; {', '.join(bad)} is not")
    return session


def prune_options(spec: PruneSpec) -> PruneOptions:
    dsnot = None
    if spec.top_up == "dsnot":
        dsnot = DSnoTOptions(max_cycles=spec.dsnot_cycles, update_threshold=spec.dsnot_threshold,
                             same_sign=spec.dsnot_same_sign, skip_mlp=spec.dsnot_skip_mlp)
    return PruneOptions(
        method=spec.method,
        pattern=parse_pattern(spec.pattern),
        granularity=spec.granularity,
        blocksize=spec.blocksize,
        percdamp=spec.percdamp,
        dsnot=dsnot,
        max_tokens=spec.max_tokens,
    )


def _shard_task(session: Session, kind: str, ratios=None, **kw):
    return lambda shard: StreamTask(
        kind=kind,
        ratios=None if ratios is None else {b: ratios[b] for b in session.shard_specs[shard].blocks},
        **kw,
    )


def stream(session: Session, hidden, task_for) -> list:
    """One stream through all shards (tasks may differ per shard); returns ShardRuns."""
    return run_stream(session.chain, task_for, hidden)[1]


@dataclass
class Allocation:
    ratios: R.Ratios
    lambda_block: float | None = None
    lambda_row: float | None = None
    curves: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    step_run: str | None = None
    extra: dict = field(default_factory=dict)


def allocate(session: Session, calib: torch.Tensor, opts: PruneOptions, progress: Progress = _noop) -> Allocation:
    """The per-block, per-linear (and per-row) sparsity of the chosen top-up."""
    spec = session.spec
    s = spec.effective_sparsity
    linears = session.family.linears
    top_up = TOPUPS.get(spec.top_up)
    if top_up.name in ("uniform", "dsnot"):
        return Allocation(R.uniform(session.n_blocks, linears, s))
    if top_up.name == "owl":
        runs = stream(session, session.embed(calib), _shard_task(session, "dense", owl_m=spec.owl_m, opts=opts))
        d = [run.records[b].outlier_ratio for run in runs for b in sorted(run.records)]
        block_s = owl_block_sparsity(d, s, spec.owl_lambda)
        return Allocation(R.per_block(block_s, linears), extra={"owl_outlier_ratio": d})
    if top_up.name == "alpha":
        from neuroal.allocation.alpha import alpha_ratios

        alphas = {}
        for i in range(session.chain.n_shards):
            alphas.update(session.chain.get(session.chain.call(i, "esd_alphas")))
        flat, block_of, numels = [], [], []
        for b in range(session.n_blocks):
            for name in linears:
                flat.append(alphas[b][name])
                block_of.append(b)
                numels.append(session.shapes[name][0] * session.shapes[name][1])
        values = alpha_ratios(flat, block_of, numels, s, spec.alpha_epsilon)
        return Allocation(R.per_linear(values, session.n_blocks, linears), extra={"esd_alpha": flat})
    if top_up.name == "neuroal":
        search = NeuroALSearch(
            session.chain,
            session.family,
            [sp.blocks for sp in session.shard_specs],
            session.shapes,
            s,
            opts,
            early_stop=spec.early_stop,
            max_in_flight=None if session.parallel else 1,
            on_candidate=lambda step, lam, outcome: progress("candidate", step=step, lam=lam, outcome=outcome),
        )
        hidden = session.embed(calib[: spec.search_windows])
        res = search.run(hidden, spec.neuroal_step)
        return Allocation(res.ratios, res.lambda_block, res.lambda_row, res.curves, res.notes, res.step_run,
                          extra={"timings_s": res.timings_s})
    raise AssertionError(top_up.name)


def final_prune(session: Session, calib: torch.Tensor, ratios: R.Ratios, opts: PruneOptions) -> dict[int, dict]:
    """Stream the calibration windows through the shards, each pruning its blocks in place."""
    needs_data = bool(opts.needs)
    hidden = session.embed(calib) if needs_data else None
    runs = stream(session, hidden, _shard_task(session, "prune", ratios, opts=opts))
    return {b: rec for run in runs for b, rec in run.records.items()}


def perplexity(
    session: Session, name: str, seqlen: int, data_dir, *, batch: int = 4, max_windows: int | None = None
) -> tuple[float, dict]:
    """exp(mean NLL) over non-overlapping windows of the dataset's test stream (papers' protocol).

    `max_windows` keeps only the first windows (a quick estimate, recorded as such).
    """
    ids, origin = perplexity_tokens(name, session.tokenizer, seqlen, data_dir)
    windows = perplexity_windows(ids, seqlen)
    all_windows = windows.shape[0]
    if max_windows is not None:
        windows = windows[:max_windows]
    session.ensure_kwargs(seqlen)
    chain = session.chain
    last = chain.n_shards - 1
    pending = []
    for i in range(0, windows.shape[0], batch):
        chunk = windows[i : i + batch]
        hidden = chain.call(0, "embed", chunk)
        for k in range(chain.n_shards):
            hidden, _ = chain.call2(k, "run", StreamTask(kind="forward"), hidden, 0.0)
        pending.append(chain.call(last, "nll", hidden, chunk))
    total = sum(chain.get(h)[0] for h in pending)
    n = windows.shape[0]
    return math.exp(total / (n * seqlen)), {"origin": origin, "windows": n, "windows_available": all_windows,
                                            "tokens": int(ids.numel())}


def evaluate_checkpoint_zeroshot(folder: Path, tasks, data_dir, limit) -> list[dict]:
    """lm-eval zero-shot tasks on a saved checkpoint (loaded the way users load it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroal.zeroshot import evaluate_zeroshot

    model = AutoModelForCausalLM.from_pretrained(folder)
    results = evaluate_zeroshot(model, AutoTokenizer.from_pretrained(folder), list(tasks), data_dir=data_dir, limit=limit)
    return [{"task": r.task, "metric": r.metric, "value": r.value, "stderr": r.stderr, "n_docs": r.n_docs}
            for r in results]


def sparsity_report(records: dict[int, dict], shapes) -> dict:
    """Actual sparsity over the prunable linears, per layer, and a per-row summary."""
    total = zeros = 0.0
    layers = {}
    rows = {}
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


def versions() -> dict:
    import importlib.metadata as md

    out = {"neuroal": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "lm_eval", "datasets", "safetensors", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def execute(
    spec: PruneSpec,
    out_dir: Path,
    progress: Progress = _noop,
    session: Session | None = None,
    resume_dir: Path | None = None,
) -> dict:
    """Run a prune into `out_dir` (a fresh folder) and return the run.json content.

    With `resume_dir`, the chosen allocation is kept there (`allocation.pt`) and reused by a rerun,
    next to the shards' pruned-block checkpoints.
    """
    from orchestrator.runio import save_checkpoint

    timings: dict[str, float] = {}
    t = time.perf_counter()
    data_dir = resolve_data_dir(spec.data_dir)
    own = session is None
    session = session or open_session(spec, resume_dir=resume_dir)
    try:
        timings["load"] = time.perf_counter() - t
        opts = prune_options(spec)
        t = time.perf_counter()
        calib, calib_origin = calibration_windows(
            spec.calibration, session.tokenizer, spec.nsamples, spec.seqlen, spec.seed, data_dir
        )
        timings["calibration"] = time.perf_counter() - t
        progress("phase", name="dense-eval")
        ppl_dense = {}
        if spec.eval_dense:
            t = time.perf_counter()
            for name in spec.eval:
                ppl_dense[name], _ = perplexity(session, name, spec.seqlen, data_dir, max_windows=spec.eval_windows)
            timings["eval_dense"] = time.perf_counter() - t
        progress("phase", name="allocation")
        t = time.perf_counter()
        saved = Path(resume_dir) / "allocation.pt" if resume_dir else None
        if saved is not None and saved.exists():
            alloc = Allocation(**torch.load(saved, weights_only=False))
            alloc.notes = alloc.notes + ["allocation restored from an interrupted earlier attempt"]
        else:
            alloc = allocate(session, calib, opts, progress)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                torch.save(alloc.__dict__, saved.with_suffix(".tmp"))
                os.replace(saved.with_suffix(".tmp"), saved)
        timings["allocation"] = time.perf_counter() - t
        timings.update({k: v for k, v in alloc.extra.pop("timings_s", {}).items()})
        progress("phase", name="prune")
        t = time.perf_counter()
        records = final_prune(session, calib, alloc.ratios, opts)
        timings["prune"] = time.perf_counter() - t
        report = sparsity_report(records, session.shapes)
        progress("phase", name="save")
        t = time.perf_counter()
        save_checkpoint(session, out_dir)
        timings["save"] = time.perf_counter() - t
        progress("phase", name="eval")
        ppl, eval_info = {}, {}
        t = time.perf_counter()
        for name in spec.eval:
            ppl[name], eval_info[name] = perplexity(session, name, spec.seqlen, data_dir, max_windows=spec.eval_windows)
        timings["eval"] = time.perf_counter() - t
        zeroshot = []
        if spec.zeroshot:
            t = time.perf_counter()
            zeroshot = evaluate_checkpoint_zeroshot(out_dir, spec.zeroshot, data_dir, spec.zeroshot_limit)
            timings["zeroshot"] = time.perf_counter() - t
    finally:
        if own:
            session.close()
    block_mean = [
        float(np.mean([np.mean(alloc.ratios[b][n]) for n in session.family.linears])) for b in range(session.n_blocks)
    ]
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
        "notes": alloc.notes,
        "block_sparsity_planned": block_mean,
        "sparsity_target": spec.effective_sparsity,
        **report,
        "perplexity": ppl,
        "perplexity_dense": ppl_dense,
        "zeroshot": zeroshot,
        "eval_data": eval_info,
        "calibration": {"origin": calib_origin, "windows": int(calib.shape[0]), "seqlen": int(calib.shape[1])},
        "allocation_extra": alloc.extra,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "host": platform.node(),
    }
