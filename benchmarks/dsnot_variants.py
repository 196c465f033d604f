"""DSnoT on SmolLM2: is "DSnoT worse than plain Wanda at 70%" the method or a defect?

Prunes SmolLM2-135M with Wanda at uniform sparsity, then with DSnoT on top in the reference's
configuration and in variants that change one choice each, and reports WikiText-2 perplexity:

- reference: 50 cycles, threshold 0.1, no same-sign rule (the reference's `--without_same_sign`
  is always true), MLP linears skipped (initial mask only);
- same-sign: the DSnoT paper's rule (stop a row when a swap would flip the sign of its error);
- with MLP: DSnoT refines the MLP linears too.

    python benchmarks/dsnot_variants.py                       # 50% and 70%, about 15 minutes here
    python benchmarks/dsnot_variants.py --sparsities 0.7 --eval-windows 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, in_child, machine, print_table, write_json

VARIANTS = {  # PruneSpec fields of each variant
    "wanda (uniform)": {"top_up": "uniform"},
    "dsnot reference": {"top_up": "dsnot"},
    "dsnot same-sign": {"top_up": "dsnot", "dsnot_same_sign": True},
    "dsnot with MLP": {"top_up": "dsnot", "dsnot_skip_mlp": False},
}


def run_variant(variant: str, sparsity: float, nsamples: int, seqlen: int, eval_windows: int) -> dict:
    from neuroal.allocation import ratios as R
    from neuroal.data import calibration_windows
    from orchestrator.evaluation.perplexity import perplexity
    from orchestrator.pruning.job import final_prune, prune_options, session_for
    from orchestrator.spec import build_spec

    spec = build_spec(method="wanda", sparsity=sparsity, seqlen=seqlen, nsamples=nsamples, executor="local",
                      data_dir=str(DATA_DIR), **VARIANTS[variant])
    s = session_for(spec)
    try:
        opts = prune_options(spec)
        calib, _ = calibration_windows("c4", s.tokenizer, nsamples, seqlen, 0, DATA_DIR)
        t = time.perf_counter()
        final_prune(s, calib, R.uniform(s.n_blocks, s.family.linears, sparsity), opts)
        prune_s = time.perf_counter() - t
        ppl, info = perplexity(s, "wikitext2", seqlen, DATA_DIR, max_windows=eval_windows)
    finally:
        s.close()
    return {"variant": variant, "sparsity": sparsity, "ppl": ppl, "prune_s": prune_s, "eval": info}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dsnot_variants.json"))
    args = ap.parse_args()
    rows, results = [], []
    for sparsity in (float(x) for x in args.sparsities.split(",")):
        for variant in VARIANTS:
            r = in_child(run_variant, variant, sparsity, args.nsamples, args.seqlen, args.eval_windows)
            results.append(r)
            rows.append([f"{sparsity:.0%}", variant, r["ppl"], r["prune_s"]])
    print_table(f"SmolLM2-135M, Wanda + DSnoT, {args.nsamples}x{args.seqlen} C4, WikiText-2 ppl "
                f"(first {args.eval_windows} windows)", ["sparsity", "variant", "perplexity", "prune s"], rows)
    write_json(Path(args.out), {"config": vars(args), "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
