"""Evaluation speed on SmolLM2: perplexity and zero-shot, each path next to its baseline, one sitting.

Perplexity (the first `--windows` WikiText-2 windows of `--seqlen` tokens, dense SmolLM2-135M, fp32;
the sparsity of a pruned checkpoint does not change dense-kernel time):
- `neuroal ray x1`: the CLI's default path (local Ray, one shard actor), `orchestrator.evaluation.perplexity`;
- `neuroal in-process`: the same code with `--executor local`;
- `neuroal ray x2, eval session`: two shard actors, batches pipelined through them, split as `neuroal eval
  --shards 2` splits (the last shard's pace counts the 49k-word head: 19 + 11 blocks);
- `neuroal ray x2, prune session`: the same, split as a pruning session (`neuroal prune --shards 2 --eval`)
  splits, by decoder blocks alone (15 + 15), as every session did before;
- `neuroal ray x1, glibc malloc defaults`: the CLI default with `NEUROAL_KEEP_FREED_MEMORY=0`, i.e. as
  it was before CPU shards kept freed host memory (`neuroal.host_memory`);
- `HF loop`: `model(x, labels=x)` one window at a time, the naive baseline, in a fresh process (so with
  glibc's malloc defaults, as a user's script runs; the in-process path changes this process's);
- `floor`: the window's FLOPs at this CPU's measured fp32 GEMM rate (a lower bound, not a run).

Zero-shot (arc_easy and hellaswag, first `--limit` documents each): stock lm-eval `HFLM` at its default
batch size (1), stock `HFLM` at our batch size, and `PackedHFLM` (contexts scored once with all their
continuations) at the default batch size, on a model loaded once; then what a user waits for,
`neuroal eval --zeroshot` end to end (model load included): the CLI default (a Ray task on the local
instance) and `--executor local`. Accuracies must be identical.

Every timed path runs `--repeats` times, interleaved; medians are quoted, ratios are of medians.

    python benchmarks/eval_speed.py [--windows 32] [--seqlen 256] [--limit 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, in_child, machine, median, print_table, write_json

MODEL = "smollm2-135m"


def gemm_rate(repeats: int = 5) -> float:
    """fp32 GFLOP/s of a [seqlen·batch, d] x [d, ffn] product, this model's dominant GEMM shape."""
    import torch

    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        best = min(best, (time.perf_counter() - t) / 20)
    return 2 * 1024 * 576 * 1536 / best / 1e9


def window_flops(config, seqlen: int) -> float:
    """Forward FLOPs of one window: every linear, attention scores and values, and the vocabulary head."""
    d, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token_linear = L * (d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size) + d * config.vocab_size
    attention = L * 2 * seqlen * seqlen * d  # QK^T and AV, causal half counted in full (what kernels compute)
    return 2 * (per_token_linear * seqlen + attention)


def neuroal_ppl(sessions: dict, name: str, windows: int, seqlen: int) -> tuple[float, float]:
    from orchestrator.evaluation.perplexity import perplexity

    t = time.perf_counter()
    value, _ = perplexity(sessions[name], "wikitext2", seqlen, DATA_DIR, max_windows=windows)
    return time.perf_counter() - t, value


def hf_loop_ppl(windows_ids) -> dict:
    """The papers' loop: mean loss per window (seqlen−1 predictions), weighted by seqlen (run in a child)."""
    import torch
    from transformers import AutoModelForCausalLM

    from neuroal.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    with torch.inference_mode():
        for w in windows_ids[:2]:  # warm-up
            model(w[None], labels=w[None])
        t = time.perf_counter()
        total = 0.0
        for w in windows_ids:
            total += model(w[None], labels=w[None]).loss.item() * w.numel()
    return {"seconds": time.perf_counter() - t, "perplexity": math.exp(total / windows_ids.numel())}


def perplexity_section(args) -> tuple[list, dict]:
    import os

    from neuroal.data import perplexity_tokens, perplexity_windows
    from neuroal.host_memory import ENV as KEEP_ENV
    from neuroal.models import load_config, resolve_model
    from orchestrator.evaluation.jobs import open_evaluation_session
    from orchestrator.pruning.job import session_for
    from orchestrator.spec import build_spec

    def pruning(**kw):  # a session as `neuroal prune --eval` opens it
        return lambda: session_for(build_spec(model=MODEL, seqlen=args.seqlen, data_dir=str(DATA_DIR), **kw))

    def evaluating(shards):  # a session as `neuroal eval` opens it
        return lambda: open_evaluation_session(MODEL, executor="ray", shards=shards, dtype="auto", device="auto",
                                               address=None, seqlen=args.seqlen)

    glibc_defaults = "neuroal ray x1, glibc malloc defaults (before)"
    paths = {"neuroal ray x1 (CLI default)": pruning(), glibc_defaults: pruning(),
             "neuroal in-process": pruning(executor="local"), "neuroal ray x2, eval session (19 + 11)": evaluating(2),
             "neuroal ray x2, prune session (15 + 15)": pruning(shards=2)}
    config = load_config(resolve_model(MODEL))
    times = {k: [] for k in [*paths, "HF loop, batch 1"]}
    ppl, splits = {}, {}
    wins = None
    for _ in range(args.repeats):  # paths interleaved; one session open at a time (each holds the CPUs)
        for label, open_path in paths.items():
            if label == glibc_defaults:  # read by the actor's process, which the session's Ray starts
                os.environ[KEEP_ENV] = "0"
            session = open_path()
            os.environ.pop(KEEP_ENV, None)
            try:
                splits[label] = [len(s.blocks) for s in session.shard_specs]
                sessions = {label: session}
                neuroal_ppl(sessions, label, 2, args.seqlen)  # warm-up: tokens, block kwargs, workers
                dt, ppl[label] = neuroal_ppl(sessions, label, args.windows, args.seqlen)
                times[label].append(dt / args.windows)
                if wins is None:
                    ids, _ = perplexity_tokens("wikitext2", session.tokenizer, args.seqlen, DATA_DIR)
                    wins = perplexity_windows(ids, args.seqlen)[: args.windows]
            finally:
                session.close()
        loop = in_child(hf_loop_ppl, wins)
        ppl["HF loop, batch 1"] = loop["perplexity"]
        times["HF loop, batch 1"].append(loop["seconds"] / args.windows)
    rate = gemm_rate()
    floor = window_flops(config, args.seqlen) / (rate * 1e9)
    loop = median(times["HF loop, batch 1"])
    rows = [[k, median(v), 1 / median(v), loop / median(v), median(v) / floor, f"{ppl[k]:.4f}"] for k, v in times.items()]
    rows.append(["floor (FLOPs at measured GEMM rate)", floor, 1 / floor, loop / floor, 1.0, ""])
    out = {"seconds_per_window": times, "perplexity": ppl, "blocks_per_shard": splits, "gemm_gflops": rate,
           "window_gflop": window_flops(config, args.seqlen) / 1e9, "floor_s_per_window": floor}
    return rows, out


def zeroshot_section(args) -> tuple[list, dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroal.models import resolve_model
    from neuroal.zeroshot import count_docs, default_batch_size, evaluate_zeroshot

    folder = resolve_model(MODEL)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tasks = ["arc_easy", "hellaswag"]
    ours = default_batch_size("cpu")
    paths = {"stock HFLM, batch 1 (its default)": {"packed": False, "batch_size": 1},
             f"stock HFLM, batch {ours}": {"packed": False, "batch_size": ours},
             f"neuroal PackedHFLM, batch {ours} (default)": {"packed": True, "batch_size": None}}
    evaluate_zeroshot(model, tok, tasks, data_dir=DATA_DIR, limit=2)  # warm-up: lm-eval imports, task loading
    times = {k: [] for k in paths}
    accs = {}
    for _ in range(args.repeats):
        for k, kw in paths.items():
            t = time.perf_counter()
            res = evaluate_zeroshot(model, tok, tasks, data_dir=DATA_DIR, limit=args.limit, **kw)
            times[k].append(time.perf_counter() - t)
            accs[k] = {f"{r.task}/{r.metric}": r.value for r in res}
    from orchestrator.evaluation.jobs import evaluate_model

    cli = {"neuroal eval --zeroshot, CLI default (Ray task, load included)": "ray",
           "neuroal eval --zeroshot --executor local (load included)": "local"}
    for k in cli:
        times[k] = []
    for _ in range(args.repeats):
        for k, executor in cli.items():
            t = time.perf_counter()
            run = evaluate_model(MODEL, zeroshot_tasks=tasks, limit=args.limit, data_dir=str(DATA_DIR),
                                 executor=executor)
            times[k].append(time.perf_counter() - t)
            accs[k] = {f"{r['task']}/{r['metric']}": r["value"] for r in run["zeroshot"]}
    docs = sum(min(args.limit, count_docs(t, DATA_DIR)) for t in tasks)
    base = median(times["stock HFLM, batch 1 (its default)"])
    ref = next(iter(accs.values()))
    rows = [[k, median(v), docs / median(v), base / median(v), str(accs[k] == ref)] for k, v in times.items()]
    return rows, {"seconds": times, "accuracies": accs, "documents": docs, "tasks": tasks}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", choices=["perplexity", "zeroshot"], default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_speed.json"))
    args = ap.parse_args()
    out = Path(args.out)
    # a skipped section keeps its last results (each section records its own config and machine)
    payload = json.loads(out.read_text()) if args.skip and out.exists() else {}
    payload.update(config=vars(args), machine=machine())
    if args.skip != "perplexity":
        rows, payload["perplexity"] = perplexity_section(args)
        payload["perplexity_config"], payload["perplexity_machine"] = vars(args), machine()
        print_table(f"Perplexity, SmolLM2, WikiText-2, {args.windows} x {args.seqlen} (medians of {args.repeats})",
                    ["path", "s / window", "windows / s", "x HF loop", "x floor", "ppl"], rows)
    if args.skip != "zeroshot":
        rows, payload["zeroshot"] = zeroshot_section(args)
        payload["zeroshot_config"], payload["zeroshot_machine"] = vars(args), machine()
        print_table(f"Zero-shot, SmolLM2, arc_easy + hellaswag, limit {args.limit} (medians of {args.repeats})",
                    ["path", "s", "docs / s", "x stock default", "same accuracies"], rows)
    write_json(out, payload)


if __name__ == "__main__":
    main()
