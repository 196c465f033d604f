"""NeuroAL search on SmolLM2 over 1, 2 and 4 Ray shard actors, and a simulated 70B run.

Measured (this machine, a local Ray instance): wall time of the search (block + row step, Wanda,
70%, 8 windows x 256 tokens), per-actor peak RSS, and pipeline utilisation = busy time in `run` /
search wall time, per actor. Same λ in every configuration (checked).

Projected (not measured): Llama-2-70B on 8 x A100-80GB. The planner gives the shards. The cost of
one candidate through one block derives from the measured SmolLM2 block time: that time's FLOPs
(two passes per block: 2 · params · tokens each, plus attention 4 · seqlen² · d per pass per window)
give the fraction of this CPU's measured GEMM rate that a whole block reaches; the A100 is assumed
to reach the same fraction of its datasheet bf16 peak (312 TFLOP/s) on the 70B block's FLOPs. The
pipeline then takes (candidates + shards − 1) stages of (blocks per shard) block-times per step;
the final pass is sequential over blocks (its stats need every window) on 128 windows x 2048 tokens.

    python benchmarks/shard_scaling.py                   # 1, 2, 4 shards (about 20 minutes here)
    python benchmarks/shard_scaling.py --shards 1,2 --seqlen 128
    python benchmarks/shard_scaling.py --project-only    # redo the projection from the stored measurements
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, in_child, machine, median, print_table, write_json

A100_BF16_PEAK = 312e12  # FLOP/s, datasheet (dense bf16 tensor cores)


def run_search(shards: int, seqlen: int) -> dict:
    import ray

    from neuroal.data import calibration_windows
    from orchestrator.pruning.job import allocate, prune_options, session_for
    from orchestrator.chain.shard import Shard
    from orchestrator.spec import build_spec

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    spec = build_spec(method="wanda", top_up="neuroal", sparsity=0.7, seqlen=seqlen, nsamples=8, executor="ray",
                      shards=shards, data_dir=str(DATA_DIR))
    s = session_for(spec)
    try:
        calib, _ = calibration_windows("c4", s.tokenizer, 8, seqlen, 0, DATA_DIR)
        s.chain.get(s.embed(calib))  # actors warm, kwargs set
        before = [s.chain.get(s.chain.call(i, Shard.report))["busy_seconds"] for i in range(shards)]
        t = time.perf_counter()
        res = allocate(spec, s, calib, prune_options(spec))
        wall = time.perf_counter() - t
        summ = [s.chain.get(s.chain.call(i, Shard.report)) for i in range(shards)]
    finally:
        s.close()
        ray.shutdown()
    return {"shards": shards, "wall_s": wall, "lambda_block": res.lambda_block, "lambda_row": res.lambda_row,
            "blocks": [x["blocks"] for x in summ],
            "utilisation": [(x["busy_seconds"] - b) / wall for x, b in zip(summ, before)],
            "peak_rss_mb": [x["peak_rss_bytes"] / 2**20 for x in summ], "timings_s": res.extra["timings_s"]}


def measure_cpu_block(seqlen: int) -> dict:
    """Median seconds of one NeuroAL candidate through one SmolLM2 block, and this CPU's matmul rate."""
    import torch

    from neuroal import block as B
    from neuroal.data import calibration_windows
    from neuroal.block_forward import capture_block_inputs
    from neuroal.families import get_blocks
    from neuroal.models import load_full, load_tokenizer, resolve_model

    folder = resolve_model("smollm2-135m")
    model, family = load_full(folder)
    ids, _ = calibration_windows("c4", load_tokenizer(folder), 8, seqlen, 0, DATA_DIR)
    inp = capture_block_inputs(model, family, ids)
    times = []
    for b in (3, 10, 20):
        blk = get_blocks(model, family)[b]
        for _ in range(3):
            t = time.perf_counter()
            B.score_block(blk, family, inp.hidden, inp.kwargs, {n: 0.7 for n in family.linears}, B.PruneOptions())
            times.append(time.perf_counter() - t)
    a, w = torch.randn(8 * seqlen, 576), torch.randn(576, 1536)
    t = time.perf_counter()
    for _ in range(20):
        a @ w
    rate = 20 * 2 * a.shape[0] * 576 * 1536 / (time.perf_counter() - t)
    return {"block_candidate_s": median(times), "cpu_flops": rate}


def _block_flops(params: float, d: int, windows: int, seqlen: int, passes: float = 2.0) -> float:
    tokens = windows * seqlen
    return passes * (2 * params * tokens + 4 * windows * seqlen * seqlen * d)


def simulate_70b(cpu: dict, seqlen_measured: int) -> dict:
    import json
    import tempfile

    from orchestrator.planning import load_plan_config, plan_shards

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
               num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
               max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "config.json"
        p.write_text(json.dumps(cfg))
        plan = plan_shards(load_plan_config(str(p)), n_actors=8, mem_per_actor=80 * 10**9, dtype="bfloat16")
    smol_params, smol_d = 3.54e6, 576
    big_params = 8192 * (8192 * 2 + 1024 * 2) + 3 * 8192 * 28672  # q,o + k,v (8 kv heads x 128) + MLP
    # measured block-candidate time -> FLOP/s a whole block reaches here -> fraction of the GEMM rate
    cpu_eff = _block_flops(smol_params, smol_d, 8, seqlen_measured) / cpu["block_candidate_s"]
    fraction = cpu_eff / cpu["cpu_flops"]
    gpu_rate = fraction * A100_BF16_PEAK
    gpu_block = _block_flops(big_params, 8192, 8, 2048) / gpu_rate
    blocks_per_shard = max(s.end_block - s.first_block for s in plan.shards)
    stage = blocks_per_shard * gpu_block
    cands = {"block": 14, "row": 15}
    search_s = sum((n + len(plan.shards) - 1) * stage for n in cands.values())
    final_block = _block_flops(big_params, 8192, 128, 2048, passes=1.75) / gpu_rate  # dense pass stops early
    final_s = 80 * final_block
    return {"plan_blocks": [[s.first_block, s.end_block - 1] for s in plan.shards],
            "gpu_block_candidate_s": gpu_block, "stage_s": stage, "search_h": search_s / 3600,
            "final_pass_h": final_s / 3600, "cpu_effective_flops": cpu_eff, "cpu_matmul_flops": cpu["cpu_flops"],
            "measured_fraction_of_gemm_rate": fraction, "gpu_peak_flops": A100_BF16_PEAK, "gpu_flops_derived": gpu_rate,
            "method": "projection: the measured SmolLM2 block time's fraction of this CPU's measured GEMM rate, "
                      "applied to the A100's 312 TFLOP/s bf16 peak, on the 70B block's FLOPs; pipeline "
                      "(candidates + shards - 1) stages; final pass sequential over 80 blocks; no communication, "
                      "host transfers or early-stop savings counted"}


def print_projection(sim: dict) -> None:
    print_table("Projected Llama-2-70B, 8 x A100-80GB, Wanda + NeuroAL (from the measured block time)",
                ["search (h)", "final pass (h)", "stage (s)", "block-candidate (s)", "derived TFLOP/s"],
                [[sim["search_h"], sim["final_pass_h"], sim["stage_s"], sim["gpu_block_candidate_s"],
                  sim["gpu_flops_derived"] / 1e12]])
    print(sim["method"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shard_scaling.json"))
    ap.add_argument("--project-only", action="store_true", help="recompute the projection from --out's measurements")
    args = ap.parse_args()
    if args.project_only:
        import json

        stored = json.loads(Path(args.out).read_text())
        stored["simulated_70b"] = sim = simulate_70b(stored["cpu"], stored["config"]["seqlen"])
        print_projection(sim)
        write_json(Path(args.out), stored)
        return
    runs = [in_child(run_search, int(n), args.seqlen) for n in args.shards.split(",")]
    base = runs[0]["wall_s"]
    rows = [[r["shards"], r["wall_s"], base / r["wall_s"], " ".join(f"{u:.2f}" for u in r["utilisation"]),
             " ".join(f"{m:.0f}" for m in r["peak_rss_mb"]), f"{r['lambda_block']}/{r['lambda_row']}"] for r in runs]
    print_table(f"NeuroAL search, SmolLM2, Wanda 70%, 8 x {args.seqlen}, local Ray on {machine()['cpus']} CPUs",
                ["shards", "wall s", "speed-up", "utilisation per actor", "peak RSS MB per actor", "λ block/row"], rows)
    cpu = in_child(measure_cpu_block, args.seqlen)
    sim = simulate_70b(cpu, args.seqlen)
    print_projection(sim)
    same = len({(r["lambda_block"], r["lambda_row"]) for r in runs}) == 1
    print(f"same λ in every configuration: {same}")
    write_json(Path(args.out), {"config": vars(args), "machine": machine(), "runs": runs, "cpu": cpu,
                                "simulated_70b": sim, "same_lambda": same})


if __name__ == "__main__":
    main()
