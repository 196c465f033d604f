"""A one-off `neuroal eval`, whole command, against a plain transformers loop's whole command; where
the fixed seconds go.

Whole commands (fresh processes, wall clock, interleaved, medians of `--repeats`) on a pruned SmolLM2
checkpoint (Wanda 50%, pruned once at the start; a checkpoint folder without run.json, so every
command computes), WikiText-2 test, windows of `--seqlen`, the first 2 and the first `--windows`:
- `HF loop`: what a user writes: AutoTokenizer + AutoModelForCausalLM from the folder, the test rows
  joined by "\\n\\n" and tokenized whole, `model(x, labels=x)` one window at a time;
- `neuroal eval` (default executor, `auto`: in-process here, as no cluster is named and one shard runs);
- `neuroal eval --executor ray` (an embedded Ray instance and one shard actor, the default before);
- `neuroal eval, cold token cache`: the default with an empty `NEUROAL_CACHE` (the test stream
  tokenized, as on a first command), over 2 windows.

Phases (one child process, in order, each timed alone): importing the CLI, the driver's config and
checkpoint check (importing transformers), the tokenizer, tokenizing WikiText-2 test, reading it
from the token cache, an in-process shard's load, Ray's start, a shard actor's start and load, Ray's
shutdown.

Done-when of issue 24: over `--windows` 128 the default is at least 1.15x the loop; over 2 windows at
most 8 s slower. Perplexities must agree (the loop's batch of 1 against our batches of 4: fp32
summation order only).

    python benchmarks/startup.py [--windows 128] [--seqlen 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, machine, median, print_table, write_json

LOOP = """
import math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, n, seqlen, raw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
rows = ["" if not line.strip() else line for line in open(raw, encoding="utf-8")]  # the HF wikitext rows
ids = tok("\\n\\n".join(rows), return_tensors="pt").input_ids
nll = 0.0
with torch.no_grad():
    for i in range(n):
        x = ids[:, i * seqlen:(i + 1) * seqlen]
        nll += model(x, labels=x).loss.item() * seqlen
print(f"ppl {math.exp(nll / (n * seqlen)):.6f}")
"""


COLD = "neuroal eval, cold token cache"


def whole(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds, perplexity) of one command in a fresh process."""
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    found = re.findall(r"ppl (?:wikitext2 \([^)]*\)\s*│\s*)?([0-9.]+)", out.stdout)
    return dt, float(found[-1])


def neuroal_cmd(folder: Path, windows: int, seqlen: int, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "eval", "--model", str(folder), "--eval", "wikitext2",
            "--seqlen", str(seqlen), "--eval-windows", str(windows), "--data-dir", str(DATA_DIR),
            "--store", str(store), *extra]


def phases(folder: str, seqlen: int) -> dict:
    """Seconds of each fixed cost of a one-off evaluation, measured one after the other in this process."""
    out = {}
    t = time.perf_counter()
    import orchestrator.cli  # noqa: F401

    out["import the CLI"] = time.perf_counter() - t
    from neuroal.data import TokenCache, perplexity_tokens, tokenizer_digest
    from neuroal.models import check_checkpoint, load_config, load_tokenizer

    folder = Path(folder)
    t = time.perf_counter()
    config = load_config(folder)
    check_checkpoint(folder, config)
    out["config + checkpoint check (imports transformers)"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = load_tokenizer(folder)
    out["tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    perplexity_tokens("wikitext2", tok, seqlen, DATA_DIR)
    out["tokenize WikiText-2 test"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        cache = TokenCache(Path(tmp), tokenizer_digest(folder))
        perplexity_tokens("wikitext2", tok, seqlen, DATA_DIR, cache=cache)
        t = time.perf_counter()
        perplexity_tokens("wikitext2", tok, seqlen, DATA_DIR, cache=cache)
        out["the same from the token cache"] = time.perf_counter() - t
    from orchestrator.chain.session import open_session

    t = time.perf_counter()
    open_session(str(folder), executor="local", seqlen=seqlen, head_runs=True).close()
    out["open an in-process shard (load)"] = time.perf_counter() - t
    import ray

    from orchestrator.chain.ray_runtime import ensure_ray

    t = time.perf_counter()
    ensure_ray(None, os.cpu_count())
    out["start the embedded Ray instance"] = time.perf_counter() - t
    t = time.perf_counter()
    session = open_session(str(folder), executor="ray", seqlen=seqlen, head_runs=True)
    out["open a shard actor (start + load)"] = time.perf_counter() - t
    session.close()
    t = time.perf_counter()
    ray.shutdown()
    out["Ray shutdown"] = time.perf_counter() - t
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = ap.parse_args()
    env = dict(os.environ, NEUROAL_DATA_DIR=str(DATA_DIR), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="neuroal-startup-") as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        subprocess.run([sys.executable, "-m", "orchestrator", "prune", "--method", "wanda", "--sparsity", "0.5",
                        "--nsamples", "16", "--seqlen", str(args.seqlen), "--executor", "local", "--out", str(run),
                        "--store", str(tmp / "prune-store"), "--data-dir", str(DATA_DIR)],
                       env=env, check=True, capture_output=True, cwd=ROOT)
        folder = tmp / "checkpoint"  # the run's checkpoint without its run.json: every command computes
        folder.mkdir()
        for f in run.iterdir():
            if f.suffix in (".json", ".safetensors", ".jinja") and f.name != "run.json":
                os.link(f, folder / f.name)
        raw = str(DATA_DIR / "wikitext2" / "wiki.test.raw")
        subprocess.run(neuroal_cmd(folder, 1, args.seqlen, tmp / "warm-store"), env=env, check=True,
                       capture_output=True, cwd=ROOT)  # the token cache holds the test stream, as after any eval
        arms = {
            "HF loop": lambda n, r: ([sys.executable, "-c", LOOP, str(folder), str(n), str(args.seqlen), raw], env),
            "neuroal eval (default: auto, in-process here)":
                lambda n, r: (neuroal_cmd(folder, n, args.seqlen, tmp / f"s-auto-{n}-{r}"), env),
            "neuroal eval --executor ray":
                lambda n, r: (neuroal_cmd(folder, n, args.seqlen, tmp / f"s-ray-{n}-{r}", "--executor", "ray"), env),
            COLD:
                lambda n, r: (neuroal_cmd(folder, n, args.seqlen, tmp / f"s-cold-{n}-{r}"),
                              dict(env, NEUROAL_CACHE=str(tmp / f"cache-{n}-{r}"))),
        }
        seconds = {n: {k: [] for k in arms} for n in (2, args.windows)}
        ppl = {n: {} for n in seconds}
        for r in range(args.repeats):
            for n in seconds:
                for label, make in arms.items():
                    if label == COLD and n != 2:
                        continue  # the cold cache costs the same seconds whatever the windows
                    dt, p = whole(*make(n, r))
                    seconds[n][label].append(dt)
                    ppl[n][label] = p
                    print(f"{n} windows, {label}: {dt:.1f} s (ppl {p:.4f})", flush=True)
        from _common import in_child

        fixed = in_child(phases, str(folder), args.seqlen)
    fixed.pop("peak_rss_bytes", None)
    loop = {n: median(seconds[n]["HF loop"]) for n in seconds}
    for n in seconds:
        rows = [[k, median(v), loop[n] / median(v), median(v) - loop[n], ppl[n][k]] for k, v in seconds[n].items() if v]
        print_table(f"{n} WikiText-2 windows of {args.seqlen}, whole command (medians of {args.repeats})",
                    ["command", "s", "x loop", "s over loop", "ppl"], rows)
        for k, p in ppl[n].items():
            assert math.isclose(p, ppl[n]["HF loop"], rel_tol=1e-4), (n, k, p)
    print_table("fixed costs, one at a time", ["phase", "s"], [[k, v] for k, v in fixed.items()])
    default = "neuroal eval (default: auto, in-process here)"
    verdict = {f"{args.windows} windows: x loop (goal >= 1.15)": loop[args.windows] / median(seconds[args.windows][default]),
               "2 windows: s over loop (goal <= 8)": median(seconds[2][default]) - loop[2]}
    print_table("issue 24's goals", ["measure", "value"], [[k, v] for k, v in verdict.items()])
    write_json(Path(args.out), {"config": vars(args), "seconds": {str(n): v for n, v in seconds.items()},
                                "perplexity": {str(n): v for n, v in ppl.items()}, "phases_s": fixed,
                                "goals": verdict, "machine": machine()})


if __name__ == "__main__":
    main()
