"""GPU check (one accelerator, < 8 minutes): a random-initialised Llama-shaped model at 7B width
(4 blocks, bf16) pruned with Wanda, SparseGPT and APT, and a NeuroAL block step on 8 x 2048 windows,
on the path users run (`orchestrator.pruning.job`: in process on CUDA, then one Ray shard actor on the GPU).

Per-block seconds, peak CUDA memory, and the ratio against a per-window loop (the same code with one
window per block call, as the reference implementations run). Then the NeuroAL block step's choice
in bfloat16 (what `--dtype auto` gives on a GPU), float32 and float32 with TF32 matmuls, side by side:
the chosen λ, every candidate's score, and the tie check's verdict (issue 26: does rounding decide
the choice on a GPU?). Prints tables, writes JSON.

    python benchmarks/gpu_check.py                 # on a GPU machine
    python benchmarks/gpu_check.py --tiny          # the same code on CPU with a small model (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, print_table, write_json


def build_model(folder: Path, tiny: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from neuroal.models import load_tokenizer, resolve_model

    shape = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    if tiny:
        shape = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4)
    cfg = LlamaConfig(vocab_size=49152, num_hidden_layers=4, max_position_embeddings=4096, **shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(folder)  # any tokenizer of this vocab
    del model


def run_case(folder: Path, calib: Path, method: str, top_up: str, windows: int, seqlen: int, max_tokens, executor,
             step: str = "block", dtype: str = "auto", tf32: bool = False) -> dict:
    import torch

    from orchestrator.pruning.job import allocate, final_prune, prune_options, session_for
    from orchestrator.chain.shard import Shard
    from orchestrator.spec import build_spec
    from neuroal.data import calibration_windows

    spec = build_spec(model=str(folder), method=method, top_up=top_up, neuroal_step=step, sparsity=0.5,
                      nsamples=windows, seqlen=seqlen, calibration=str(calib), search_windows=windows,
                      executor=executor, max_tokens=max_tokens, dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    session = session_for(spec)
    try:
        calib_ids, _ = calibration_windows(spec.calibration, session.tokenizer, windows, seqlen, 0, None)
        opts = prune_options(spec)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        alloc = allocate(spec, session, calib_ids, opts)
        search_s = time.perf_counter() - t
        t = time.perf_counter()
        final_prune(session, calib_ids, alloc.ratios, opts)
        session.chain.get(session.chain.call(0, Shard.get_shapes))  # a round trip: the prune has finished
        prune_s = time.perf_counter() - t
        report = session.chain.get(session.chain.call(0, Shard.report))
    finally:
        session.close()
        torch.backends.cuda.matmul.allow_tf32 = False
    return {"curves": alloc.curves, "notes": alloc.notes, "tie_check": alloc.extra.get("tie_check"), "tf32": tf32, "method": method, "top_up": top_up, "executor": executor, "max_tokens": max_tokens,
            "search_s": search_s, "prune_s": prune_s, "blocks": session.n_blocks, "lambda_block": alloc.lambda_block,
            "device": report["device"], "dtype": report["dtype"], "peak_device_bytes": report["peak_device_bytes"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a small model (runs on CPU too)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args()
    import torch

    seqlen = 128 if args.tiny else args.seqlen
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder, calib = Path(tmp) / "model", Path(tmp) / "calib.pt"
        t = time.perf_counter()
        build_model(folder, args.tiny)
        torch.save(torch.randint(0, 49152, (args.windows, seqlen)), calib)
        print(f"model built in {time.perf_counter() - t:.1f} s", flush=True)
        per_window = seqlen  # one window per block call: the reference's loop
        cases = [("wanda", "uniform", None, "local"), ("wanda", "uniform", per_window, "local"),
                 ("sparsegpt", "uniform", None, "local"), ("sparsegpt", "uniform", per_window, "local"),
                 ("apt", "uniform", None, "local"),
                 ("wanda", "neuroal", None, "local"), ("wanda", "neuroal", per_window, "local"),
                 ("wanda", "neuroal", None, "ray")]
        for method, top_up, max_tokens, executor in cases:
            r = run_case(folder, calib, method, top_up, args.windows, seqlen, max_tokens, executor)
            results.append(r)
            peak = r["peak_device_bytes"]
            rows.append([method, top_up, executor, "per-window" if max_tokens else "batched",
                         r["search_s"] / r["blocks"], r["prune_s"] / r["blocks"],
                         "" if peak is None else f"{peak / 2**30:.2f}", r["device"], str(r["lambda_block"])])
            print(rows[-1], flush=True)
    ratios = {}
    for a, b, name in ((1, 0, "wanda prune"), (3, 2, "sparsegpt prune"), (6, 5, "neuroal block step")):
        key = "search_s" if "neuroal" in name else "prune_s"
        ratios[name] = results[a][key] / results[b][key]
    print_table(f"GPU check: Llama 7B width, 4 blocks, {args.windows} x {seqlen} windows (seconds per block)",
                ["method", "top-up", "executor", "windows per call", "search s/block", "prune s/block",
                 "peak GiB", "device", "λ block"], rows)
    print("per-window loop / batched:", {k: round(v, 2) for k, v in ratios.items()})
    choices = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, calib = Path(tmp) / "model", Path(tmp) / "calib.pt"
        build_model(folder, args.tiny)
        torch.save(torch.randint(0, 49152, (args.windows, seqlen)), calib)
        for dtype, tf32 in (("bfloat16", False), ("float32", False), ("float32", True)):
            r = run_case(folder, calib, "wanda", "neuroal", args.windows, seqlen, None, "local", dtype=dtype, tf32=tf32)
            choices.append(r)
            print(dtype, "tf32" if tf32 else "", r["lambda_block"], r["notes"], flush=True)
    print_table("NeuroAL block step by compute dtype (same model, windows and code)",
                ["dtype", "λ block", "search s/block", "tie check"],
                [[r["dtype"] + (" + TF32" if r["tf32"] else ""), str(r["lambda_block"]), r["search_s"] / r["blocks"],
                  "near tie" if (r["tie_check"] or {}).get("block", {}).get("near_tie") else "clear"] for r in choices])
    write_json(Path(args.out), {"config": vars(args), "machine": machine(), "cuda": torch.cuda.is_available() and
                                torch.cuda.get_device_name(), "results": results, "ratio_per_window_over_batched": ratios,
                                "dtype_choices": choices})


if __name__ == "__main__":
    main()
