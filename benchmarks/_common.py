"""Shared helpers for the benchmark scripts: timing, peak memory in a child process, table + JSON."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA_DIR = Path(os.environ.get("NEUROAL_DATA_DIR", ROOT.parent / "shared" / "data"))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(fn, args, queue):
    try:
        out = fn(*args)
        out["peak_rss_bytes"] = peak_rss_bytes()
        queue.put(out)
    except BaseException as exc:  # report, never hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def in_child(fn, *args) -> dict:
    """Run fn(*args) -> dict in a fresh process so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get()
    p.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def machine() -> dict:
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}


def write_json(path: Path, payload: dict) -> None:
    from neuroal.fileio import write_json_atomic

    write_json_atomic(path, payload)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r])
    Console().print(t)
