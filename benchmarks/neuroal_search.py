"""NeuroAL search on SmolLM2 (8 windows x 256 tokens): our search vs the reference code's way.

Three measurements, same data, same model, one process each:
1. ours: the NeuroAL allocator (`orchestrator.pruning.job.allocate`) on one in-process shard with exact early stopping (the default);
2. ours, brute force (early stopping off): every candidate scored to the end;
3. reference style: a transcription of eliacunegatti/NeuroAL `get_neuroal_block`/`get_neuroal_row`
   (per-window loop, `get_forward` clones, `WrappedGPT` statistics with mean and variance, sort
   masks), run for every candidate of both steps, so its choices and time are measured, not
   assumed.
Then the final Wanda prune with the chosen allocation on the full calibration set.

    python benchmarks/neuroal_search.py                  # everything (about 20 minutes here)
    python benchmarks/neuroal_search.py --reference one  # time one reference candidate per step, extrapolate
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, in_child, machine, median, print_table, write_json

SPARSITY = 0.7


def run_ours(early_stop: bool, nsamples: int) -> dict:
    from neuroal.data import calibration_windows
    from orchestrator.pruning.job import allocate, final_prune, prune_options, session_for
    from orchestrator.spec import build_spec

    spec = build_spec(method="wanda", top_up="neuroal", sparsity=SPARSITY, seqlen=256, nsamples=nsamples,
                      executor="local", early_stop=early_stop, data_dir=str(DATA_DIR))
    s = session_for(spec)
    calib, _ = calibration_windows("c4", s.tokenizer, nsamples, 256, 0, DATA_DIR)
    opts = prune_options(spec)
    t = time.perf_counter()
    res = allocate(spec, s, calib, opts)
    total = time.perf_counter() - t
    t = time.perf_counter()
    final_prune(s, calib, res.ratios, opts)
    prune_s = time.perf_counter() - t
    stopped = {step: sum(not p["complete"] for p in pts) for step, pts in res.curves.items()}
    timings = res.extra["timings_s"]
    return {"lambda_block": res.lambda_block, "lambda_row": res.lambda_row, "block_s": timings["search_block"],
            "row_s": timings["search_row"], "search_s": total, "final_prune_s": prune_s,
            "stopped_early": stopped, "curves": res.curves}


# ---------------------------------------------------------------- the reference code's way


def _reference_forward(torch, layer, subset, inps, kwargs):
    """`lib/utils.get_forward`: clone, per-window loop, WrappedGPT stats (mean, var, scaler_row)."""
    inps = inps.clone()
    outs = torch.zeros_like(inps)
    st = {n: {"scaler": torch.zeros(m.in_features), "mean": torch.zeros(m.in_features, 1),
              "var": torch.zeros(m.in_features, 1), "n": 0, "tok": 0} for n, m in subset.items()}

    def hook(name):
        def fn(_m, inp, _o):
            s = st[name]
            x = inp[0].reshape(-1, inp[0].shape[-1]).t().float()
            mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
            k = x.shape[1]
            s["var"] = var if s["tok"] == 0 else (s["var"] * s["tok"] + var * k) / (s["tok"] + k)
            s["mean"] = mean if s["tok"] == 0 else (s["mean"] * s["tok"] + mean * k) / (s["tok"] + k)
            s["tok"] += k
            s["scaler"] *= s["n"] / (s["n"] + 1)
            s["n"] += 1
            s["scaler"] += torch.norm(x, p=2, dim=1) ** 2 / s["n"]

        return fn

    from neuroal.block_forward import call_block

    handles = [m.register_forward_hook(hook(n)) for n, m in subset.items()]
    with torch.no_grad():
        for j in range(inps.shape[0]):
            outs[j] = call_block(layer, inps[j].unsqueeze(0), kwargs)[0]
    for h in handles:
        h.remove()
    return {n: torch.sqrt(s["scaler"]) for n, s in st.items()}, outs


def _reference_mask(torch, metric, ratio):
    if isinstance(ratio, float):  # compute_mask(..., "row")
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * ratio)]
        return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
    order = torch.sort(metric, dim=-1, stable=True, descending=True)[1]  # "neuron": keep the top
    keep = ((1 - torch.tensor(ratio, dtype=torch.float64)) * metric.shape[1]).long()
    ranks = torch.arange(metric.shape[1]).reshape(1, -1) >= keep.reshape(-1, 1)
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, order, ranks)


def _reference_candidate(torch, blocks, family, inps, kwargs, dist):
    metrics, alignment = [], {}
    for b, layer in enumerate(blocks):
        subset = {n: layer.get_submodule(n) for n in family.linears}
        act_d, _ = _reference_forward(torch, layer, subset, inps, kwargs)
        weights = {n: m.weight.data.clone() for n, m in subset.items()}
        for n, m in subset.items():
            metric = torch.abs(weights[n]) * act_d[n].reshape(1, -1)
            m.weight.data[_reference_mask(torch, metric, dist[b][n])] = 0.0
        act_s, outs = _reference_forward(torch, layer, subset, inps, kwargs)
        inps = outs
        for n, m in subset.items():
            m.weight.data = weights[n]
            d, s = act_d[n], act_s[n]
            metrics.append(torch.norm(d / d.sum() - s / s.sum(), p=2).item() / d.numel())
            alignment.setdefault(b, {})[n] = d - s
    return sum(metrics), alignment


def run_reference(which: str) -> dict:
    import numpy as np
    import torch

    from neuroal.allocation import ratios as R
    from neuroal.allocation.neuroal import row_ratios
    from neuroal.allocation.schedule import block_lambdas, neuroal_block_sparsity, row_lambdas
    from neuroal.data import calibration_windows
    from neuroal.block_forward import capture_block_inputs
    from neuroal.families import get_blocks
    from neuroal.models import load_full, load_tokenizer, resolve_model

    folder = resolve_model("smollm2-135m")
    model, family = load_full(folder)
    ids, _ = calibration_windows("c4", load_tokenizer(folder), 8, 256, 0, DATA_DIR)
    inputs = capture_block_inputs(model, family, ids)
    blocks = get_blocks(model, family)
    shapes = {n: (blocks[0].get_submodule(n).out_features, blocks[0].get_submodule(n).in_features) for n in family.linears}
    out = {"block": {}, "row": {}, "block_times": [], "row_times": []}
    lams = block_lambdas(SPARSITY) if which == "all" else (0.12,)
    aligns = {}
    for lam in lams:
        dist = R.per_block(neuroal_block_sparsity(len(blocks), SPARSITY, lam), family.linears)
        t = time.perf_counter()
        out["block"][lam], aligns[lam] = _reference_candidate(torch, blocks, family, inputs.hidden, inputs.kwargs, dist)
        out["block_times"].append(time.perf_counter() - t)
    best = min(lams, key=lambda lam: (out["block"][lam], lams.index(lam)))
    base = R.per_block(neuroal_block_sparsity(len(blocks), SPARSITY, best), family.linears)
    for lam in row_lambdas() if which == "all" else (0.1,):
        dist, _ = row_ratios(family, shapes, base, aligns[best], lam)
        dist = {b: {n: np.asarray(v) for n, v in d.items()} for b, d in dist.items()}
        t = time.perf_counter()
        out["row"][lam], _ = _reference_candidate(torch, blocks, family, inputs.hidden, inputs.kwargs, dist)
        out["row_times"].append(time.perf_counter() - t)
    rl = list(out["row"])
    out["lambda_block"] = best
    out["lambda_row"] = min(rl, key=lambda lam: (out["row"][lam], rl.index(lam)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", choices=["all", "one", "none"], default="all")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of the final prune")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "neuroal_search.json"))
    args = ap.parse_args()
    ours = in_child(run_ours, True, args.nsamples)
    brute = in_child(run_ours, False, args.nsamples)
    ref = in_child(run_reference, args.reference) if args.reference != "none" else None
    n_block, n_row = len(brute["curves"]["block"]), len(brute["curves"]["row"])
    rows = [
        ["ours (exact early stop)", ours["block_s"], ours["row_s"], ours["search_s"], ours["final_prune_s"],
         f"{ours['lambda_block']}/{ours['lambda_row']}", f"{ours['stopped_early']}"],
        ["ours, brute force", brute["block_s"], brute["row_s"], brute["search_s"], brute["final_prune_s"],
         f"{brute['lambda_block']}/{brute['lambda_row']}", "-"],
    ]
    summary = {"ours": ours, "brute": brute}
    if ref is not None:
        per_block, per_row = median(ref["block_times"]), median(ref["row_times"])
        ref_total = per_block * n_block + per_row * n_row
        choice = f"{ref['lambda_block']}/{ref['lambda_row']}" if args.reference == "all" else "(not run)"
        rows.append(["reference style" + (" (measured)" if args.reference == "all" else " (1 candidate, x29)"),
                     per_block * n_block, per_row * n_row, ref_total, float("nan"), choice, "-"])
        summary.update(reference=ref, reference_total_s=ref_total, speedup=ref_total / ours["search_s"],
                       speedup_brute=ref_total / brute["search_s"],
                       same_choice=(ref["lambda_block"], ref["lambda_row"]) == (ours["lambda_block"], ours["lambda_row"])
                       if args.reference == "all" else None,
                       reference_candidate_s={"block": per_block, "row": per_row})
        # candidate scores: ours vs the reference transcription
        if args.reference == "all":
            diffs = [abs(p["score"] - ref["block"][p["lambda"]]) / ref["block"][p["lambda"]]
                     for p in brute["curves"]["block"]]
            summary["max_rel_score_diff_block"] = max(diffs)
    print_table("NeuroAL search, SmolLM2-135M, Wanda 70%, 8 x 256 search windows (seconds)",
                ["run", "block step", "row step", "search", f"final prune ({args.nsamples} w)", "λ block/row",
                 "stopped early"], rows)
    if ref is not None:
        print(f"speed-up of the search vs the reference style: {summary['speedup']:.2f}x "
              f"(brute force {summary['speedup_brute']:.2f}x); same choice: {summary.get('same_choice')}")
    write_json(Path(args.out), {"config": vars(args), "machine": machine(), **summary})


if __name__ == "__main__":
    main()
