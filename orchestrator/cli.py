"""The `neuroal` command line: prune, demo, plan, grid, report.

Bad input exits with status 2 and one line naming the flag and the allowed values.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from neuroal.errors import NeuroalError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distributed one-shot pruning of LLMs (NeuroAL).")
console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "ray", "lm_eval", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _Reporter:
    """Renders driver events: a bar per phase over blocks, one line per λ candidate."""

    def __init__(self, progress: Progress, n_blocks: int):
        self.progress = progress
        self.n_blocks = n_blocks
        self.task = None

    def phase(self, name: str) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(name, total=self.n_blocks)

    def __call__(self, event: str, **info) -> None:
        if event == "phase":
            self.phase(info["name"])
        elif event == "block" and self.task is not None:
            self.progress.update(self.task, completed=info["block"] + 1, description=info["kind"])
        elif event == "candidate":
            out = info["outcome"]
            state = f"{out.total:.6g}" if out.total is not None else f"> {out.partial:.6g} (stopped early)"
            self.progress.console.print(f"  {info['step']} λ={info['lam']:.2f}: {state}", highlight=False)


def run_prune(spec, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Run one prune into its out folder (resuming a finished identical run); returns run.json."""
    from orchestrator.driver import execute, open_session
    from orchestrator.runio import RUN_JSON, RunFolder, read_run, write_json_atomic

    out = Path(spec.out or spec.default_out())
    previous = read_run(out) if out.exists() else None
    if previous is not None and previous.get("cell_key") == spec.cell_key() and not overwrite:
        console.print(f"[green]already done:[/] {out} (same spec; pass --overwrite to redo)")
        return previous
    if out.exists() and not overwrite and any(out.iterdir()):
        raise NeuroalError(f"--out: {out} holds another run; choose another folder or pass --overwrite")
    with Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet, transient=True) as bar:
        partial = out.parent / f".{out.name}.partial-{spec.cell_key()}"
        session = open_session(spec, resume_dir=partial)
        try:
            report = _Reporter(bar, session.n_blocks)
            for shard in getattr(session.chain, "shards", []):
                shard.on_block = lambda kind, b: report("block", kind=kind, block=b)
            with RunFolder(out) as tmp:
                run = execute(spec, tmp, progress=report, session=session, resume_dir=partial)
                run["out"] = str(out)
                write_json_atomic(tmp / RUN_JSON, run)
                from orchestrator.plots import run_plots

                run_plots(run, tmp)
        finally:
            session.close()
    shutil.rmtree(partial, ignore_errors=True)
    from orchestrator.store import append_run_rows

    append_run_rows(run)
    return run


def summary_table(run: dict) -> Table:
    spec = run["spec"]
    t = Table(title=f"{spec['model']} · {spec['method']} · {spec['top_up']} · {run['sparsity_target']:g} {spec['pattern']}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("actual sparsity", f"{run['sparsity_actual']:.4f}")
    if run.get("lambda_block") is not None:
        t.add_row("λ block", f"{run['lambda_block']:.2f}")
    if run.get("lambda_row") is not None:
        t.add_row("λ row", f"{run['lambda_row']:.2f}")
    for name, v in run.get("perplexity_dense", {}).items():
        t.add_row(f"ppl {name} dense", f"{v:.3f}")
    for name, v in run.get("perplexity", {}).items():
        t.add_row(f"ppl {name} pruned", f"{v:.3f}")
    for phase, s in run.get("timings_s", {}).items():
        t.add_row(f"time {phase}", f"{s:.1f} s")
    t.add_row("out", run.get("out", ""))
    return t


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m", help="Hugging Face id, local checkpoint folder, or smollm2-135m"),
    method: str = typer.Option("wanda", help="magnitude, wanda, sparsegpt, multiflow, apt"),
    top_up: str = typer.Option("uniform", help="uniform, owl, alpha, dsnot, neuroal"),
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
    data_dir: Optional[str] = typer.Option(None, help="local data folder (default: $NEUROAL_DATA_DIR, else the hub)"),
    out: Optional[str] = typer.Option(None, help="run folder (default runs/<model>-<method>-<top-up>-<s>-<pattern>)"),
    shards: int = typer.Option(1, help="number of shard actors (contiguous block ranges)"),
    address: Optional[str] = typer.Option(None, help="Ray address (default $RAY_ADDRESS, else a local instance)"),
    executor: str = typer.Option("ray", help="ray (local instance or cluster) or local (in-process, no Ray)"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16"),
    device: str = typer.Option("cpu", help="device of in-process shards (cpu, cuda, cuda:1)"),
    early_stop: bool = typer.Option(True, help="stop λ candidates that can no longer win (exact)"),
    overwrite: bool = typer.Option(False, help="redo a finished run in --out"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Prune one model and write a run folder (checkpoint, run.json, plots)."""
    _setup_logging(verbose)
    from orchestrator.spec import build_spec

    try:
        spec = build_spec(
            model=model, method=method, top_up=top_up, neuroal_step=neuroal_step, sparsity=sparsity,
            pattern=pattern, granularity=granularity, calibration=calibration, nsamples=nsamples,
            seqlen=seqlen, seed=seed, eval=eval, eval_dense=eval_dense, eval_windows=eval_windows, data_dir=data_dir, out=out,
            shards=shards, address=address or os.environ.get("RAY_ADDRESS"), executor=executor,
            dtype=dtype, device=device, early_stop=early_stop,
        )
        run = run_prune(spec, overwrite=overwrite)
    except NeuroalError as exc:
        _fail(exc)
    Console().print(summary_table(run))


@app.command()
def demo(
    seqlen: int = typer.Option(256, help="tokens per window (papers: 2048; small here to run in minutes)"),
    nsamples: int = typer.Option(32, help="calibration windows"),
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
                              out=f"{out}/wanda-{top_up}-{s:g}", executor=executor)
            rows.append(run_prune(spec))
    except NeuroalError as exc:
        _fail(exc)
    t = Table(title=f"SmolLM2-135M, Wanda + {top_up}, WikiText-2 perplexity (seqlen {seqlen})")
    for col in ("sparsity", "actual", "λ block", "λ row", "perplexity", "prune s"):
        t.add_column(col, justify="right")
    dense = rows[0]["perplexity_dense"]["wikitext2"]
    t.add_row("0 (dense)", "0", "", "", f"{dense:.2f}", "")
    for r in rows:
        lb, lr = r.get("lambda_block"), r.get("lambda_row")
        t.add_row(f"{r['sparsity_target']:g}", f"{r['sparsity_actual']:.4f}", "" if lb is None else f"{lb:.2f}",
                  "" if lr is None else f"{lr:.2f}", f"{r['perplexity']['wikitext2']:.2f}",
                  f"{sum(r['timings_s'].get(k, 0) for k in ('allocation', 'prune')):.0f}")
    Console().print(t)


def main() -> None:  # pragma: no cover
    try:
        app()
    except NeuroalError as exc:
        console.print(f"error: {exc}")
        sys.exit(2)
