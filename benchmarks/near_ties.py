"""How often is NeuroAL's λ a coin flip, and what does the flip cost? (SmolLM2, issue 12.)

For each sparsity and number of search windows: the block step's winner, its lead over the runner-up
and the score's float noise (both re-scored with the windows in reverse order: `TieCheck`), then
WikiText-2 perplexity of the model pruned with the winner's and with the runner-up's allocation, so
the cost of a near-tie flip is measured, not guessed. More search windows is the documented way to a
robust choice; the reference-order tie rule picks the earlier λ of a near tie.

    python benchmarks/near_ties.py [--sparsities 0.5,0.6,0.7] [--windows 8,16] [--seqlen 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import DATA_DIR, ROOT, in_child, machine, print_table, write_json


def run(sparsity: float, windows: int, seqlen: int, nsamples: int, eval_windows: int) -> dict:
    from neuroal.allocation.neuroal import block_candidates
    from neuroal.data import calibration_windows
    from orchestrator.evaluation.perplexity import perplexity
    from orchestrator.pruning.job import allocate, final_prune, prune_options, session_for
    from orchestrator.spec import build_spec

    spec = build_spec(method="wanda", top_up="neuroal", neuroal_step="block", sparsity=sparsity, seqlen=seqlen,
                      nsamples=max(nsamples, windows), search_windows=windows, executor="local",
                      data_dir=str(DATA_DIR))
    out = {"sparsity": sparsity, "windows": windows}
    s = session_for(spec)
    try:
        calib, _ = calibration_windows("c4", s.tokenizer, spec.nsamples, seqlen, 0, DATA_DIR)
        alloc = allocate(spec, s, calib, prune_options(spec))
        check = alloc.extra["tie_check"]["block"]
        out.update(check)
    finally:
        s.close()
    cands = None
    for key, lam in (("ppl_best", check["best"]), ("ppl_runner_up", check["runner_up"])):
        s = session_for(spec)
        try:
            cands = cands or block_candidates(s.n_blocks, sparsity, s.family.linears)
            final_prune(s, calib, cands[lam], prune_options(spec))
            out[key], _ = perplexity(s, "wikitext2", seqlen, DATA_DIR, max_windows=eval_windows)
        finally:
            s.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--windows", default="8,16")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "near_ties.json"))
    args = ap.parse_args()
    rows, results = [], []
    for sparsity in (float(x) for x in args.sparsities.split(",")):
        for windows in (int(x) for x in args.windows.split(",")):
            r = in_child(run, sparsity, windows, args.seqlen, args.nsamples, args.eval_windows)
            results.append(r)
            rows.append([f"{sparsity:.0%}", windows, f"{r['best']:g}", f"{r['runner_up']:g}", f"{r['margin']:.3g}",
                         f"{r['noise']:.3g}", str(r["near_tie"]), r["ppl_best"], r["ppl_runner_up"]])
    print_table(f"NeuroAL block step over Wanda, SmolLM2, windows of {args.seqlen}; WikiText-2 ppl (first "
                f"{args.eval_windows} windows), calibration {args.nsamples} windows",
                ["sparsity", "search windows", "λ best", "runner-up", "lead", "noise", "near tie", "ppl best",
                 "ppl runner-up"], rows)
    write_json(Path(args.out), {"config": vars(args), "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
