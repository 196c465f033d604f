"""The `neuroal` command line: prune, demo, plan, grid, report.

Bad input exits with status 2 and one line naming the flag and the allowed values.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from neuroal import fileio
from neuroal.allocation import ALLOCATORS
from neuroal.errors import NeuroalError, SpecError
from neuroal.methods import METHODS
from orchestrator.planning.cost import ASSUMED_DISK_GBPS, ASSUMED_H2D_GBPS, ASSUMED_TFLOPS
from orchestrator.results.record import RunRecord

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distributed one-shot pruning of LLMs (NeuroAL).")
console = Console(stderr=True)


ZEROSHOT_HELP = ("comma list of lm-eval task, group or tag names (any the installed lm-eval knows, e.g. "
                 "arc_easy,piqa,mmlu,gsm8k; offline: rte,winogrande,boolq,hellaswag,arc_easy,arc_challenge,"
                 "openbookqa with --data-dir, or your own with --zeroshot-include)")
INCLUDE_HELP = "folder of your own lm-eval task YAMLs (lm-eval's --include_path); their names join --zeroshot"
def _plugin_help(registry, what: str) -> str:
    names = ", ".join(registry.names() + registry.plugin_names())
    return f"{names}, or package.module:object in your own installed package: {what} (README: Your own method)"


FEWSHOT_HELP = "examples per zero-shot prompt (lm-eval's --num_fewshot; a task whose YAML says 0 stays 0)"


def _version(value: bool) -> None:
    if value:
        from neuroal import __version__

        typer.echo(f"neuroal {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Distributed one-shot pruning of LLMs (NeuroAL)."""


def prune_flags() -> set[str]:
    """The spec fields `neuroal prune` has a flag of its own for (its parameters)."""
    import inspect

    return set(inspect.signature(prune).parameters)


def settable() -> list[str]:
    """The PruneSpec fields `neuroal prune` has no flag for: `--set key=value` reaches them."""
    from orchestrator.spec import PruneSpec

    flags = prune_flags()
    return [f for f in PruneSpec.model_fields if f not in flags]


def set_knobs(pairs: list[str]) -> dict[str, str]:
    """`--set key=value` pairs as spec fields; the values stay text: the spec parses and checks them
    (`spec_with_knobs` names a bad one as `--set key`)."""
    import difflib

    allowed, flags = settable(), prune_flags()
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key in flags:
            raise SpecError("--set", pair, f"knobs without a flag of their own (use --{key.replace('_', '-')})")
        if not eq or key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close and eq else ""
            raise SpecError("--set", pair, "key=value with key one of " + ", ".join(allowed) + hint)
        out[key] = value.strip()
    return out


def spec_with_knobs(pairs: list[str], **flags):
    """`build_spec` from the flags and the `--set` knobs; a bad knob's value is named `--set key`."""
    from orchestrator.spec import build_spec

    knobs = set_knobs(pairs)
    try:
        return build_spec(**flags, **knobs)
    except SpecError as exc:
        key = exc.field.removeprefix("--").replace("-", "_")
        if key in knobs:
            raise SpecError(f"--set {key}", knobs[key], exc.allowed) from None
        raise


def _fail(exc: Exception) -> None:
    from rich.markup import escape

    # escaped: a message's own brackets ("[n, seqlen]") are text, not rich markup
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "ray", "lm_eval", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _Reporter:
    """Renders run events: a bar per phase over blocks, one line per λ candidate."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.n_blocks = 0
        self.task = None

    def phase(self, name: str) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(name, total=self.n_blocks)

    def __call__(self, event: str, **info) -> None:
        if event == "resumed":
            self.progress.console.print(f"[green]already pruned:[/] {info['out']} (same spec; only missing "
                                        "evaluations are computed; pass --overwrite to redo)")
        elif event == "open":
            self.n_blocks = info["n_blocks"]
        elif event == "phase":
            self.phase(info["name"])
        elif event == "block" and self.task is not None:
            self.progress.update(self.task, completed=info["block"] + 1, description=info["kind"])
        elif event == "candidate":
            out = info["outcome"]
            state = f"{out.total:.6g}" if out.total is not None else f"> {out.partial:.6g} (stopped early)"
            self.progress.console.print(f"  {info['step']} λ={info['lam']:.2f}: {state}", highlight=False)


def run_with_progress(spec, *, overwrite: bool = False, store: bool | str | Path = True) -> RunRecord:
    """`orchestrator.pruning.job.prune` with a progress bar on the console."""
    from orchestrator.pruning.job import prune as prune_one

    with Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        return prune_one(spec, overwrite=overwrite, store=store, progress=_Reporter(bar))


def summary_table(run: RunRecord) -> Table:
    spec = run.spec
    t = Table(title=f"{spec['model']} · {run.method} · {run.top_up} · {run.sparsity_target:g} {spec['pattern']}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("actual sparsity", f"{run.sparsity_actual:.4f}")
    if run.lambda_block is not None:
        t.add_row("λ block", f"{run.lambda_block:.2f}")
    if run.lambda_row is not None:
        t.add_row("λ row", f"{run.lambda_row:.2f}")
    for step, c in (run.data.get("allocation_extra") or {}).get("tie_check", {}).items():
        if c.get("margin") is not None and c.get("noise") is not None:
            t.add_row(f"λ {step} lead / noise", f"{c['margin']:.3g} / {c['noise']:.3g}" + (" NEAR TIE" if c["near_tie"] else ""))
    for name, v in run.perplexity_dense.items():
        t.add_row(f"ppl {name} dense", f"{v:.3f}")
    _evaluation_rows(t, run)
    for phase, s in run.timings_s.items():
        t.add_row(f"time {phase}", f"{s:.1f} s")
    t.add_row("out", run.out or "")
    return t


def _evaluation_rows(t: Table, run: RunRecord) -> None:
    """Every evaluation on record, each with its protocol (seqlen and windows, or documents)."""
    for e in run.evaluations:
        if e.kind == "perplexity":
            t.add_row(f"ppl {e.task} ({e.protocol})", f"{e.value:.3f}")
        else:
            t.add_row(f"{e.task} {e.metric} ({e.protocol})", f"{e.value:.4f} ± {e.stderr:.4f}")


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m", help="Hugging Face id, local checkpoint folder, or smollm2-135m"),
    method: str = typer.Option("wanda", help=_plugin_help(METHODS, "a Method or a score function (W, stats)")),
    top_up: str = typer.Option("uniform", help=_plugin_help(ALLOCATORS, "an Allocator subclass or instance")),
    neuroal_step: str = typer.Option("both", help="block, row, both"),
    sparsity: float = typer.Option(0.5, help="fraction of the prunable linears' weights to remove"),
    pattern: str = typer.Option("unstructured", help="unstructured, 2:4, 4:8"),
    granularity: str = typer.Option("row", help="row (per output row) or layer (score methods)"),
    calibration: str = typer.Option("c4", help="c4, wikitext2, ptb, a text file, or a file of token ids"),
    nsamples: int = typer.Option(128, help="calibration windows"),
    seqlen: int = typer.Option(2048, help="tokens per window"),
    seed: int = typer.Option(0),
    eval: str = typer.Option("", help="comma list of wikitext2,c4,ptb or files"),
    eval_dense: bool = typer.Option(False, help="also evaluate the dense model first"),
    eval_windows: Optional[int] = typer.Option(None, help="evaluate only the first N windows (default: all)"),
    zeroshot: str = typer.Option("", help=ZEROSHOT_HELP),
    zeroshot_limit: Optional[int] = typer.Option(None, help="documents per zero-shot task (default: all)"),
    zeroshot_include: Optional[str] = typer.Option(None, help=INCLUDE_HELP),
    num_fewshot: int = typer.Option(0, help=FEWSHOT_HELP),
    data_dir: Optional[str] = typer.Option(None, help="local data folder (default: $NEUROAL_DATA_DIR, else the hub)"),
    out: Optional[str] = typer.Option(None, help="run folder (default runs/<model>-<method>-<top-up>-<s>-<pattern>)"),
    shards: int = typer.Option(1, help="number of shard actors (contiguous block ranges)"),
    gpu_mem: Optional[str] = typer.Option(None, help="memory per actor for the shard plan, e.g. 80GB (checked)"),
    offload: str = typer.Option("auto", help="auto (when the blocks do not fit --gpu-mem), none, cpu, disk"),
    address: Optional[str] = typer.Option(None, help="Ray address (default $RAY_ADDRESS, else a local instance)"),
    executor: str = typer.Option("ray", help="ray (local instance or cluster), local (in-process, no Ray), or "
                                 "auto (Ray for a cluster or several shards, else in-process)"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"),
    device: str = typer.Option("auto", help="auto (a GPU where Ray or this machine has one, else CPU), cpu, cuda"),
    early_stop: bool = typer.Option(True, help="stop λ candidates that can no longer win (exact)"),
    neuroal_tie_check: bool = typer.Option(True, help="NeuroAL: re-score each step's best two to bound float noise"),
    neuroal_tie_rule: str = typer.Option("lowest", help="NeuroAL near ties: lowest (the reference) or reference-order"),
    moe_calibrate_all_experts: bool = typer.Option(False, help="MoE: every expert's statistics over all tokens"),
    moe_min_tokens: int = typer.Option(1, help="MoE: an expert routed fewer calibration tokens is calibrated on all"),
    knobs: list[str] = typer.Option([], "--set", help="any other knob as key=value, repeatable: "
                                    "blocksize, percdamp, owl_m, owl_lambda, alpha_epsilon, dsnot_cycles, "
                                    "dsnot_threshold, dsnot_same_sign, dsnot_skip_mlp, search_windows, max_tokens, "
                                    "... (every PruneSpec field without a flag; `--check` prints them all)"),
    store: Optional[str] = typer.Option(None, help="results store folder (default $NEUROAL_STORE or runs/store)"),
    overwrite: bool = typer.Option(False, help="redo a finished run in --out"),
    check: bool = typer.Option(False, "--check", help="validate the flags and print the spec, run nothing"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Prune one model and write a run folder (checkpoint, run.json, plots)."""
    _setup_logging(verbose)
    try:
        spec = spec_with_knobs(
            knobs, model=model, method=method, top_up=top_up, neuroal_step=neuroal_step, sparsity=sparsity,
            pattern=pattern, granularity=granularity, calibration=calibration, nsamples=nsamples,
            seqlen=seqlen, seed=seed, eval=eval, eval_dense=eval_dense, eval_windows=eval_windows, zeroshot=zeroshot, zeroshot_limit=zeroshot_limit,
            zeroshot_include=zeroshot_include, num_fewshot=num_fewshot, data_dir=data_dir, out=out,
            shards=shards, gpu_mem=gpu_mem, offload=offload, address=address or os.environ.get("RAY_ADDRESS"), executor=executor,
            dtype=dtype, device=device, early_stop=early_stop, moe_calibrate_all_experts=moe_calibrate_all_experts,
            neuroal_tie_check=neuroal_tie_check, neuroal_tie_rule=neuroal_tie_rule,
            moe_min_tokens=moe_min_tokens,
        )
        if check:
            Console().print_json(spec.model_dump_json())
            return
        run = run_with_progress(spec, overwrite=overwrite, store=store or True)
    except NeuroalError as exc:
        _fail(exc)
    Console().print(summary_table(run))


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="a run folder (its run.json gains the metrics), a checkpoint folder or hub id"),
    eval: str = typer.Option("", help="comma list of wikitext2,c4,ptb or files"),
    zeroshot: str = typer.Option("", help=ZEROSHOT_HELP),
    seqlen: Optional[int] = typer.Option(None, help="tokens per perplexity window (default: the run's, else 2048)"),
    eval_windows: Optional[int] = typer.Option(None, help="evaluate only the first N windows (default: all)"),
    zeroshot_limit: Optional[int] = typer.Option(None, help="documents per zero-shot task (default: all)"),
    zeroshot_include: Optional[str] = typer.Option(None, help=INCLUDE_HELP),
    num_fewshot: int = typer.Option(0, help=FEWSHOT_HELP),
    data_dir: Optional[str] = typer.Option(None, help="local data folder (default: $NEUROAL_DATA_DIR, else the hub)"),
    shards: int = typer.Option(1),
    executor: str = typer.Option("auto", help="auto: Ray when --address/$RAY_ADDRESS names a cluster or --shards > 1, "
                                 "else in-process (a one-off command starts fast); ray; local"),
    address: Optional[str] = typer.Option(None, help="Ray address (default $RAY_ADDRESS)"),
    dtype: str = typer.Option("auto"), device: str = typer.Option("auto"),
    store: Optional[str] = typer.Option(None, help="results store (default $NEUROAL_STORE or runs/store)"),
):
    """Evaluate without pruning: perplexity through the shards, zero-shot via lm-eval; rows to the store."""
    _setup_logging(False)
    from orchestrator.api import evaluate

    try:
        run = evaluate(model, eval=eval, zeroshot=zeroshot, seqlen=seqlen, eval_windows=eval_windows,
                       zeroshot_limit=zeroshot_limit, zeroshot_include=zeroshot_include, num_fewshot=num_fewshot,
                       data_dir=data_dir, shards=shards, executor=executor, address=address, dtype=dtype,
                       device=device, store=store or True)
    except NeuroalError as exc:
        _fail(exc)
    t = Table(title=f"{model} · {run.method}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    _evaluation_rows(t, run)
    Console().print(t)


@app.command()
def demo(
    seqlen: int = typer.Option(128, help="tokens per window (papers: 2048; small here to run in minutes)"),
    nsamples: int = typer.Option(32, help="calibration windows"),
    eval_windows: int = typer.Option(64, help="perplexity windows (the first N of WikiText-2 test)"),
    shards: int = typer.Option(1, help="shard actors"),
    top_up: str = typer.Option("neuroal", help="allocation to demo"),
    executor: str = typer.Option("ray"),
    data_dir: Optional[str] = typer.Option(None),
    out: str = typer.Option("runs/demo"),
):
    """SmolLM2-135M, Wanda at 50% and 70%: WikiText-2 perplexity before and after."""
    _setup_logging(False)
    from orchestrator.spec import build_spec

    rows = []
    try:
        for s in (0.5, 0.7):
            spec = build_spec(model="smollm2-135m", method="wanda", top_up=top_up, sparsity=s, seqlen=seqlen,
                              nsamples=nsamples, eval="wikitext2", eval_dense=not rows, data_dir=data_dir,
                              eval_windows=eval_windows, shards=shards, out=f"{out}/wanda-{top_up}-{s:g}",
                              executor=executor)
            rows.append(run_with_progress(spec))
    except NeuroalError as exc:
        _fail(exc)
    t = Table(title=f"SmolLM2-135M, Wanda + {top_up}, WikiText-2 perplexity (seqlen {seqlen})")
    for col in ("sparsity", "actual", "λ block", "λ row", "perplexity", "prune s"):
        t.add_column(col, justify="right")
    dense = rows[0].perplexity_dense["wikitext2"]
    t.add_row("0 (dense)", "0", "", "", f"{dense:.2f}", "")
    for r in rows:
        lb, lr = r.lambda_block, r.lambda_row
        t.add_row(f"{r.sparsity_target:g}", f"{r.sparsity_actual:.4f}", "" if lb is None else f"{lb:.2f}",
                  "" if lr is None else f"{lr:.2f}", f"{r.perplexity['wikitext2']:.2f}",
                  f"{sum(r.timings_s.get(k, 0) for k in ('allocation', 'prune')):.0f}")
    Console().print(t)


@app.command()
def grid(
    spec: str = typer.Argument(..., help="grid YAML (see grids/smoke.yaml)"),
    store: str = typer.Option("runs/grid-store", help="results store folder (run folders go in STORE/runs)"),
    data_dir: Optional[str] = typer.Option(None, help="local data folder (default: $NEUROAL_DATA_DIR, else the hub)"),
    address: Optional[str] = typer.Option(None, help="Ray address (default $RAY_ADDRESS, else a local instance)"),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray instance"),
    check: bool = typer.Option(False, "--check", help="validate the grid and list its cells, run nothing"),
):
    """Run a benchmark grid: prune every cell and evaluate it, resumably, into a Parquet store."""
    _setup_logging(False)
    from orchestrator.grid import cell_done, expand, load_grid, run_grid
    from orchestrator.results.store import existing_keys

    address = address or os.environ.get("RAY_ADDRESS")
    try:
        fileio.check_folder(store, "--store")
        g = load_grid(spec)
        if address and not check:  # before the summary: a cluster that does not answer is the one line
            from orchestrator.chain.ray_runtime import check_address

            check_address(address)
        plan = expand(g, Path(store))
        have = existing_keys(store)
        todo = [c for c in plan.cells if not cell_done(c, have)]
        console.print(f"grid {g.name}: {len(plan.cells)} cells ({len(plan.cells) - len(todo)} done), "
                      f"{len(plan.cells) * len(plan.cells[0].evals) if plan.cells else 0} evaluations; "
                      f"{len(plan.skipped)} combinations skipped")
        for label, why in plan.skipped:
            console.print(f"  skipped {label}: {why}", highlight=False)
        if check:
            for c in plan.cells:
                console.print(f"  {c.key} {c.label}", highlight=False)
            return
        data_dir = data_dir or os.environ.get("NEUROAL_DATA_DIR")
        from rich.live import Live

        with Live(console=console, refresh_per_second=2) as live:
            states = run_grid(g, Path(store), data_dir=data_dir, address=address,
                              num_cpus=num_cpus, on_update=lambda st: live.update(_grid_table(st)))
    except NeuroalError as exc:
        _fail(exc)
    failed = [s for s in states.values() if s.status == "failed"]
    Console().print(_grid_table(states))
    if failed:
        console.print(f"[red]{len(failed)} cell(s) failed[/]; their errors are rows in the store (metric 'error')")
        raise typer.Exit(1)


def _grid_table(states) -> Table:
    t = Table(title="grid cells")
    for col in ("cell", "status", "evals left", "λ block", "λ row", "error"):
        t.add_column(col)
    colours = {"done": "green", "failed": "red", "pruning": "yellow", "evaluating": "cyan", "queued": "white"}
    for st in states.values():
        run = st.run or {}
        lb, lr = run.get("lambda_block"), run.get("lambda_row")
        t.add_row(st.cell.label, f"[{colours.get(st.status, 'white')}]{st.status}[/]", str(st.evals_left),
                  "" if lb is None else f"{lb:g}", "" if lr is None else f"{lr:g}", (st.error or "")[:60])
    return t


@app.command()
def report(
    store: str = typer.Argument(..., help="results store folder"),
    out: str = typer.Option("runs/report", help="folder for tables (.md/.csv) and plots (.png)"),
):
    """Tables in the paper's shape and plots from a results store."""
    _setup_logging(False)
    from orchestrator.results.report import build_report

    if not Path(store).is_dir():
        _fail(NeuroalError(f"store: {store!r} is not a folder"))
    try:
        fileio.check_folder(out, "--out")
        files = build_report(store, out)
    except NeuroalError as exc:
        _fail(exc)
    for kind, paths in files.items():
        for p in paths:
            console.print(f"{kind}: {p}", highlight=False)


@app.command()
def plan(
    model: str = typer.Option("smollm2-135m", help="hub id, local folder, config.json path, or smollm2-135m"),
    gpus: Optional[int] = typer.Option(None, help="number of actors (default: the fewest that fit)"),
    gpu_mem: str = typer.Option("80GB", help="memory per accelerator, e.g. 80GB, 24GiB"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16, float32"),
    method: str = typer.Option("wanda"),
    streams: int = typer.Option(2, help="streams in flight per actor"),
    seqlen: int = typer.Option(2048),
    nsamples: int = typer.Option(128, help="calibration windows of the final pass (one stream of them all)"),
    sparsity: float = typer.Option(0.5, help="target sparsity: the NeuroAL search's λ set, for the offloaded projection"),
    offload: str = typer.Option("auto", help="auto (when the blocks do not fit), none, cpu, disk"),
    tflops: float = typer.Option(ASSUMED_TFLOPS, help="sustained device TFLOP/s for the offloaded time projection"),
    h2d_gbps: float = typer.Option(ASSUMED_H2D_GBPS, help="host->device GB/s for the projection"),
    disk_gbps: float = typer.Option(ASSUMED_DISK_GBPS, help="local disk read GB/s for the projection"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the plan as JSON"),
):
    """Plan shards for a model without loading weights: blocks, bytes and activation memory per actor.

    When the blocks do not fit the GPUs (or --offload cpu/disk), the plan is offloaded: each actor
    holds its blocks in host memory or on disk and moves one at a time to its GPU; it then prints
    each actor's device, host and disk need and a projected time of the prune, with its method.
    """
    _setup_logging(False)
    import json

    from orchestrator.api import plan as make_plan

    try:
        result = make_plan(model, gpus=gpus, gpu_mem=gpu_mem, dtype=dtype, method=method, streams=streams,
                           seqlen=seqlen, nsamples=nsamples, sparsity=sparsity, offload=offload, tflops=tflops,
                           h2d_gbps=h2d_gbps, disk_gbps=disk_gbps)
    except NeuroalError as exc:
        _fail(exc)
    for table in result.tables(method):
        Console().print(table)
    payload = result.payload
    if json_out:
        Path(json_out).write_text(json.dumps(payload, indent=2))
