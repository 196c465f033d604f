"""Offloaded NeuroAL search on SmolLM2: stream-major vs block-major, wall time and block moves.

One in-process shard with every block offloaded (`--offload cpu`: host memory, or `disk`: a local
safetensors file per block), the block step's 14 candidates on 8 x 128 search windows:
- stream-major: candidates one after another (the resident path's order, exact early stop on);
- block-major: all candidates through block b before block b+1 (what offloaded shards run).
Same scores and choice; the table shows medians of repeats, their ratio and how often each block
went to the device. On this CPU a "move" of a host-offloaded block is a no-op (the device is the
host), so the disk mode is where moving less shows.

    python benchmarks/offload.py [--repeats 3] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, in_child, machine, median, print_table, write_json


def run(mode: str, block_major: bool, seqlen: int) -> dict:
    from neuroal.allocation import AllocationProblem
    from neuroal.allocation.neuroal import NeuroAL
    from neuroal.data import calibration_windows
    from neuroal.methods import METHODS
    from orchestrator.pruning.evidence import StreamScorer
    from orchestrator.pruning.job import prune_options, session_for
    from orchestrator.chain.shard import Shard
    from orchestrator.spec import build_spec

    spec = build_spec(method="wanda", top_up="neuroal", neuroal_step="block", neuroal_tie_check=False, sparsity=0.7,
                      seqlen=seqlen, nsamples=8, executor="local", offload=mode, data_dir=str(DATA_DIR))
    s = session_for(spec)
    try:
        calib, _ = calibration_windows("c4", s.tokenizer, 8, seqlen, 0, DATA_DIR)
        problem = AllocationProblem(s.n_blocks, s.family.linears, s.shapes, 0.7, s.family, METHODS.get("wanda"))
        scorer = StreamScorer(s, calib, prune_options(spec), block_major=block_major)
        t = time.perf_counter()
        alloc = NeuroAL(step="block", tie_check=False).allocate(problem, scorer)
        wall = time.perf_counter() - t
        moves = s.chain.get(s.chain.call(0, Shard.report))["offload"]["moves"].get("score", {})
    finally:
        s.close()
    return {"mode": mode, "block_major": block_major, "wall_s": wall, "lambda_block": alloc.lambda_block,
            "moves_per_block": sorted(set(moves.values())), "moves_total": sum(moves.values()),
            "scores": [p["score"] for p in alloc.curves["block"] if p["complete"]]}


def summary(results: dict) -> dict:
    """Per offload mode: median wall time of each order, their ratio, block moves, same λ."""
    out = {}
    for mode in ("cpu", "disk"):
        s, b = results[f"{mode}-stream"], results[f"{mode}-block"]
        ms, mb = median([r["wall_s"] for r in s]), median([r["wall_s"] for r in b])
        out[mode] = {"median_stream_s": ms, "median_block_s": mb, "block_over_stream_speedup": ms / mb,
                     "moves_stream": s[0]["moves_total"], "moves_block": b[0]["moves_total"],
                     "same_lambda": s[0]["lambda_block"] == b[0]["lambda_block"]}
    return out


def print_summary(results: dict, summ: dict, config: dict) -> None:
    rows = []
    for mode, m in summ.items():
        s, b = results[f"{mode}-stream"][0], results[f"{mode}-block"][0]
        rows.append([mode, "stream-major", m["median_stream_s"], m["moves_stream"], str(s["moves_per_block"]), "",
                     str(m["same_lambda"])])
        rows.append([mode, "block-major", m["median_block_s"], m["moves_block"], str(b["moves_per_block"]),
                     f"{m['block_over_stream_speedup']:.2f}x", str(m["same_lambda"])])
    print_table(f"NeuroAL block step, SmolLM2, offloaded, 8 x {config['seqlen']} (medians of {config['repeats']})",
                ["offload", "order", "search s", "block moves", "moves per block", "speed-up", "same λ"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "offload.json"))
    ap.add_argument("--summary-only", action="store_true", help="recompute the medians from --out's runs")
    args = ap.parse_args()
    if args.summary_only:
        import json

        stored = json.loads(Path(args.out).read_text())
        stored["summary"] = summary(stored["results"])
        print_summary(stored["results"], stored["summary"], stored["config"])
        write_json(Path(args.out), stored)
        return
    results = {}
    for mode in ("cpu", "disk"):
        for bm in (False, True):
            rs = [in_child(run, mode, bm, args.seqlen) for _ in range(args.repeats)]
            results[f"{mode}-{'block' if bm else 'stream'}"] = rs
    summ = summary(results)
    print_summary(results, summ, vars(args))
    write_json(Path(args.out), {"config": vars(args), "machine": machine(), "results": results, "summary": summ})


if __name__ == "__main__":
    main()
