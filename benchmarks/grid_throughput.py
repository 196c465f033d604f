"""Grid throughput: cells/hour and evaluation tasks/hour with 1 vs 2 concurrent Ray workers.

A small SmolLM2 grid (magnitude and Wanda at 50% and 70%, seqlen 64, 16 calibration windows),
each cell evaluated on WikiText-2 perplexity (16 windows) and arc_easy (limit 40), run into a fresh
store with a local Ray instance of 1, then 2 CPUs (one task per CPU).

    python benchmarks/grid_throughput.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from _common import DATA_DIR, ROOT, in_child, machine, print_table, write_json

GRID = {
    "name": "throughput",
    "models": ["smollm2-135m"],
    "methods": ["magnitude", "wanda"],
    "top_ups": ["uniform"],
    "sparsities": [0.5, 0.7],
    "nsamples": 16,
    "seqlen": 64,
    "eval_windows": 16,
    "tasks": {"perplexity": ["wikitext2"], "zeroshot": ["arc_easy"]},
    "zeroshot_limit": 40,
    "prune": {"executor": "local"},
}


def run(num_cpus: int) -> dict:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per Ray task: CPUs are the workers
    from orchestrator.grid import load_grid, run_grid
    from orchestrator.results.store import read_store

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "grid.yaml"
        spec.write_text(yaml.safe_dump(GRID))
        store = Path(tmp) / "store"
        t = time.perf_counter()
        states = run_grid(load_grid(spec), store, data_dir=str(DATA_DIR), num_cpus=num_cpus)
        wall = time.perf_counter() - t
        rows = read_store(store).table.num_rows
    cells = len(states)
    tasks = sum(len(s.cell.evals) for s in states.values())
    return {"num_cpus": num_cpus, "wall_s": wall, "cells": cells, "eval_tasks": tasks, "rows": rows,
            "cells_per_hour": cells / wall * 3600, "tasks_per_hour": tasks / wall * 3600,
            "failed": [s.error for s in states.values() if s.status != "done"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grid_throughput.json"))
    args = ap.parse_args()
    runs = [in_child(run, n) for n in (1, 2)]
    rows = [[r["num_cpus"], r["wall_s"], r["cells_per_hour"], r["tasks_per_hour"], r["rows"],
             runs[0]["wall_s"] / r["wall_s"]] for r in runs]
    print_table("Grid throughput, SmolLM2 (4 cells x 2 evaluations)",
                ["workers", "wall s", "cells/hour", "eval tasks/hour", "store rows", "speed-up"], rows)
    write_json(Path(args.out), {"grid": GRID, "machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
