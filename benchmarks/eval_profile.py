"""Where a perplexity window's time goes on this CPU, and how far each part is from its floor.

The perplexity path's unit of work (one batch of `--batch` WikiText-2 windows of `--seqlen` tokens
through SmolLM2-135M's 30 blocks, then the chunked NLL head, fp32, in this process with the shard's
malloc setting) is timed per module with forward hooks: wall-clock per call, summed per kind. (The
torch profiler is not used: on this 2-core machine its per-op bookkeeping doubled the GEMMs' time.)
Every GEMM kind is also timed alone at its exact shape (operands hot in cache): its best rate on this
CPU. The table gives each part's time per window, its FLOPs, the rate it reached in the model, and
the time it would take at its isolated rate; the rest (norms, SwiGLU's product, residual adds,
attention's softmax and rotary) is memory-bound work with no GEMM floor.

    python benchmarks/eval_profile.py [--batch 4] [--seqlen 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, machine, median, print_table, write_json

MODEL = "smollm2-135m"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TIMED = (*LINEARS, "self_attn", "mlp", "act_fn", "input_layernorm", "post_attention_layernorm", "lm_head")


def isolated_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of x[m, k] @ W[n, k]^T (nn.Linear's product) with both operands hot."""
    import torch

    x, w = torch.randn(m, k), torch.randn(n, k)
    calls = max(1, int(2e9 // (2 * m * k * n)))  # ~2 GFLOP per timing
    for _ in range(2):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t) / calls)
    return 2 * m * k * n / best / 1e9


def main():
    import torch

    from neuroal.block_forward import apply_head
    from neuroal.data import perplexity_tokens, perplexity_windows
    from neuroal.evaluation import nll_sum
    from neuroal.host_memory import keep_freed_host_memory
    from neuroal.models import load_full, load_tokenizer, resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_profile.json"))
    args = ap.parse_args()

    keep_freed_host_memory()  # as a CPU shard does
    folder = resolve_model(MODEL)
    model, family = load_full(folder)
    cfg = model.config
    ids, _ = perplexity_tokens("wikitext2", load_tokenizer(folder), args.seqlen, DATA_DIR)
    x = perplexity_windows(ids, args.seqlen)[: args.batch]
    tokens = args.batch * args.seqlen

    spent: dict[str, float] = collections.defaultdict(float)
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in TIMED:
            module.register_forward_pre_hook(lambda m, a: setattr(m, "_t0", time.perf_counter()))
            module.register_forward_hook(lambda m, a, o, kind=kind: spent.__setitem__(
                kind, spent[kind] + time.perf_counter() - m._t0))

    runs: list[dict[str, float]] = []
    with torch.inference_mode():
        for r in range(args.repeats + 1):
            spent.clear()
            t = time.perf_counter()
            hidden = model.model(x, use_cache=False).last_hidden_state
            t_blocks = time.perf_counter()
            nll_sum(lambda h: apply_head(model, family, h), hidden, x)
            end = time.perf_counter()
            if r:  # the first run warms up
                runs.append(dict(spent, blocks=t_blocks - t, nll=end - t_blocks, total=end - t))
    per_window = {k: median([run[k] for run in runs]) / args.batch for k in runs[0]}

    d, ffn, vocab, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, ffn), "up_proj": (d, ffn), "down_proj": (ffn, d)}
    head_tokens = args.batch * (args.seqlen - 1)
    rows, parts = [], {}
    for kind, (k, n) in shapes.items():
        flop = 2 * tokens * k * n * L / args.batch
        parts[kind] = {"s": per_window[kind], "gflop": flop / 1e9, "isolated_gflops": isolated_rate(tokens, k, n)}
    parts["lm_head"] = {"s": per_window["lm_head"], "gflop": 2 * head_tokens * d * vocab / args.batch / 1e9,
                        "isolated_gflops": isolated_rate(head_tokens, d, vocab)}
    attn_flop = L * 2 * 2 * args.seqlen * args.seqlen * d  # QK^T and AV over the full square (what kernels compute)
    parts["attention core (SDPA, rotary)"] = {
        "s": per_window["self_attn"] - sum(per_window[k] for k in ("q_proj", "k_proj", "v_proj", "o_proj")),
        "gflop": attn_flop / 1e9, "isolated_gflops": None}
    parts["norms, SiLU, SwiGLU product"] = {
        "s": per_window["input_layernorm"] + per_window["post_attention_layernorm"]
        + per_window["mlp"] - sum(per_window[k] for k in ("gate_proj", "up_proj", "down_proj")),
        "gflop": 0.0, "isolated_gflops": None}
    parts["cross-entropy, final norm"] = {"s": per_window["nll"] - per_window["lm_head"], "gflop": 0.0,
                                          "isolated_gflops": None}
    accounted = sum(p["s"] for p in parts.values())
    parts["residual adds, embedding, calls"] = {"s": per_window["total"] - accounted, "gflop": 0.0,
                                                "isolated_gflops": None}
    total = per_window["total"]
    for kind, p in parts.items():
        rate = p["gflop"] / p["s"] if p["s"] > 0 and p["gflop"] else None
        at_floor = p["gflop"] / p["isolated_gflops"] if p["isolated_gflops"] else None
        p.update(achieved_gflops=rate, s_at_isolated_rate=at_floor)
        rows.append([kind, p["s"] * 1e3, p["s"] / total, p["gflop"], "" if rate is None else f"{rate:.0f}",
                     "" if p["isolated_gflops"] is None else f"{p['isolated_gflops']:.0f}",
                     "" if at_floor is None else f"{at_floor * 1e3:.1f}"])
    gemm_s = sum(p["s"] for p in parts.values() if p["isolated_gflops"])
    gemm_floor = sum(p["s_at_isolated_rate"] for p in parts.values() if p["isolated_gflops"])
    best = max(p["isolated_gflops"] for p in parts.values() if p["isolated_gflops"])
    all_flop = sum(p["gflop"] for p in parts.values())
    rows.append(["total (measured)", total * 1e3, 1.0, all_flop, f"{all_flop / total:.0f}", "", ""])
    print_table(f"Perplexity window profile, SmolLM2, batch {args.batch} x {args.seqlen}, fp32, median of "
                f"{args.repeats}", ["part", "ms / window", "share", "GFLOP", "GFLOP/s here", "GFLOP/s alone",
                                    "ms at that rate"], rows)
    summary = {"measured_s_per_window": total, "gemm_s": gemm_s, "gemm_s_at_isolated_rates": gemm_floor,
               "other_s": total - gemm_s, "best_isolated_gflops": best,
               "all_flops_at_best_rate_s": all_flop / best}
    print(f"GEMMs {gemm_s * 1e3:.0f} ms/window (at their isolated rates {gemm_floor * 1e3:.0f}); the rest "
          f"{(total - gemm_s) * 1e3:.0f} ms; every FLOP at the best GEMM rate ({best:.0f} GFLOP/s): "
          f"{all_flop / best * 1e3:.0f} ms")
    write_json(Path(args.out), {"config": vars(args), "machine": machine(), "parts": parts, "summary": summary})


if __name__ == "__main__":
    main()
