"""Does float rounding decide NeuroAL's λ? (issue 26) SmolLM2, the same calibration tokens in every run.

For each setting (method, sparsity) and each variant of the same problem (compute dtype float32 or
bfloat16; 2 or 1 torch threads, a stand-in for another machine's kernels), the NeuroAL search as
`neuroal prune` runs it (block then row step, block only for solver methods; early stop and the tie
check on): the λs, every candidate's score, the tie check's lead and noise, seconds. Then:

- **noise**: each block-step candidate's score spread across the variants (max - min over the mean),
  for candidates every variant scored to the end; beside it, the lead of each variant's winner;
- **where it enters**: at blocks 0, 15 and 29, each variant against float32 on 2 threads: the drift
  of the block's input after the dense forwards, of the Wanda input norms, the fraction of mask
  entries that flip at the uniform ratio, and of the block's NeuroAL metric at the uniform ratio;
- **what it costs**: every allocation a variant chose, and each block step's winner and runner-up
  (block ratios only), pruned and evaluated in float32 on held-out WikiText-2 (the first
  `--eval-windows` test windows), so each near-tie rule's pick can be scored against perplexity.

    python benchmarks/dtype_fidelity.py                          # Wanda 70%, the issue's fixed-token case
    python benchmarks/dtype_fidelity.py --settings wanda:0.5,wanda:0.6,wanda:0.7,wanda:0.8,sparsegpt:0.5,sparsegpt:0.7
    # the other variants beside an earlier fp32-only run of the same protocol (its searches are not repeated)
    python benchmarks/dtype_fidelity.py --settings ... --no-probe --nsamples 32 --seqlen 128 \
        --baseline benchmarks/results/dtype_fidelity_rules.json --out benchmarks/results/dtype_fidelity_variants.json
    # its tables again, nothing recomputed: the same command with --baseline its own --out (and --out elsewhere)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import DATA_DIR, ROOT, in_child, machine, median, print_table, write_json

VARIANTS = {"fp32": ("float32", 2), "fp32-1thread": ("float32", 1), "bf16": ("bfloat16", 2)}
PROBE_BLOCKS = (0, 15, 29)
RULES = ("lowest", "reference-order", "smaller-λ")


def _spec(method: str, sparsity: float, dtype: str, args, **kw):
    from orchestrator.spec import build_spec

    return build_spec(model="smollm2-135m", method=method, top_up="neuroal", sparsity=sparsity, seqlen=args.seqlen,
                      nsamples=args.nsamples, executor="local", dtype=dtype, data_dir=str(DATA_DIR), **kw)


def _calibration(session, args):
    from neuroal.data import calibration_windows

    return calibration_windows("c4", session.tokenizer, args.nsamples, args.seqlen, 0, DATA_DIR)[0]


def _probe(ids, dtype: str, blocks, ratio: float, opts) -> dict:
    """Block inputs, Wanda input norms, masks at `ratio` and the NeuroAL metric at `ratio`, at `blocks`
    (the whole model in `dtype`, dense forwards from the embedded windows `ids`)."""
    import copy

    import torch

    from neuroal import block as B
    from neuroal import stats as S
    from neuroal.block_forward import capture_block_inputs
    from neuroal.families import get_blocks
    from neuroal.models import load_full, resolve_model
    from neuroal.prunable import block_linears

    model, family = load_full(resolve_model("smollm2-135m"), dtype=getattr(torch, dtype))
    inputs = capture_block_inputs(model, family, ids)
    hidden, out = inputs.hidden, {}
    for b, block in enumerate(get_blocks(model, family)[:max(blocks) + 1]):
        kwargs = inputs.kwargs_for(b)
        if b in blocks:
            _, rec = B.dense_block(block, family, hidden, kwargs, kinds=frozenset({S.NORMS}),
                                   summary=lambda w, st: {n: s.norms.float().clone() for n, s in st.items()})
            ratios = {n: ratio for n in block_linears(block, family)}
            _, scored = B.score_block(block, family, hidden, kwargs, ratios, opts)
            pruned = copy.deepcopy(block)
            B.prune_block(pruned, family, hidden, kwargs, ratios, opts, want_output=False)
            masks = {n: lin.weight.data == 0 for n, lin in block_linears(pruned, family).items()}
            out[b] = {"input": hidden.float().clone(), "norms": rec.summary, "masks": masks,
                      "metric": sum(scored.metric.values())}
            del pruned
        with torch.no_grad():
            hidden = B.forward_block(block, hidden, kwargs)
    return out


def _plain(x):
    """Tensors as numpy arrays, so results cross the process boundary by value (not shared memory)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def search(method: str, sparsity: float, variant: str, args) -> dict:
    """One variant's NeuroAL search (the user's path: `allocate`), and the probe of where noise enters."""
    import torch

    from orchestrator.pruning.job import allocate, prune_options, session_for

    dtype, threads = VARIANTS[variant]
    torch.set_num_threads(threads)
    spec = _spec(method, sparsity, dtype, args, search_windows=args.search_windows)
    session = session_for(spec)
    try:
        calib = _calibration(session, args)
        opts = prune_options(spec)
        t = time.perf_counter()
        alloc = allocate(spec, session, calib, opts)
        seconds = time.perf_counter() - t
    finally:
        session.close()
    probe = _probe(calib[:spec.search_windows], dtype, PROBE_BLOCKS, sparsity, opts) if args.probe else {}
    return {"lambda_block": alloc.lambda_block, "lambda_row": alloc.lambda_row, "curves": alloc.curves,
            "tie_check": alloc.extra.get("tie_check", {}), "notes": alloc.notes, "search_s": seconds,
            "ratios": _plain(alloc.ratios), "probe": _plain(probe)}


def evaluate(method: str, sparsity: float, ratios, args) -> dict:
    """WikiText-2 perplexity of `ratios` pruned and evaluated in float32 on 2 threads."""
    import torch

    from orchestrator.evaluation.perplexity import perplexity
    from orchestrator.pruning.job import final_prune, prune_options, session_for

    torch.set_num_threads(2)
    spec = _spec(method, sparsity, "float32", args)
    session = session_for(spec)
    try:
        final_prune(session, _calibration(session, args), ratios, prune_options(spec))
        ppl, _ = perplexity(session, "wikitext2", args.seqlen, DATA_DIR, max_windows=args.eval_windows)
    finally:
        session.close()
    return {"ppl": ppl}


def _rel(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def where_noise_enters(probes: dict) -> list[dict]:
    """Each variant's probe against float32 on 2 threads, per probed block."""
    ref, rows = probes["fp32"], []
    for variant, probe in probes.items():
        if variant == "fp32":
            continue
        for b in sorted(probe):
            r, p = ref[b], probe[b]
            flips = sum(int((p["masks"][n] != r["masks"][n]).sum()) for n in r["masks"])
            total = sum(m.size for m in r["masks"].values())
            rows.append({"variant": variant, "block": b, "input_drift": _rel(p["input"], r["input"]),
                         "norm_drift": max(_rel(p["norms"][n], r["norms"][n]) for n in r["norms"]),
                         "mask_flips": flips / total, "metric_drift": abs(p["metric"] - r["metric"]) / r["metric"]})
    return rows


def _finished(run: dict, step: str) -> dict[float, float]:
    """λ -> score of the candidates a run's `step` scored to the end."""
    return {p["lambda"]: p["score"] for p in run["curves"].get(step, []) if p["complete"]}


def candidate_spread(runs: dict) -> list[dict]:
    """Per block-step λ: the spread of its finished scores across variants, relative to their mean."""
    curves = {v: _finished(r, "block") for v, r in runs.items()}
    lambdas = [p["lambda"] for p in next(iter(runs.values()))["curves"]["block"]]
    out = []
    for lam in lambdas:
        scores = [c[lam] for c in curves.values() if lam in c]
        if len(scores) == len(curves):
            mean = sum(scores) / len(scores)
            out.append({"lambda": lam, "mean": mean, "spread": (max(scores) - min(scores)) / mean})
    return out


def lead_movement(runs: dict) -> dict[str, float]:
    """Per step, the most that switching variant moved a pairwise lead (score a - score b over the smaller),
    over candidate pairs every variant finished; the row step only among variants of the same block λ
    (another block λ gives other row candidates). What the tie check's rounding floor has to cover."""
    import itertools

    out, first_block = {}, next(iter(runs.values()))["lambda_block"]
    for step in ("block", "row"):
        curves = [_finished(r, step) for r in runs.values() if step == "block" or r["lambda_block"] == first_block]
        if len(curves) < 2:
            continue
        common = sorted(set.intersection(*(set(c) for c in curves)))
        moves = [max(leads) - min(leads) for a, b in itertools.combinations(common, 2)
                 for leads in [[(c[a] - c[b]) / min(c[a], c[b]) for c in curves]]]
        if moves:  # at least two candidates every variant finished
            out[step] = max(moves)
    return out


def _lead(run: dict, step: str) -> str:
    """A step's lead and tie-check noise, as fractions of the winner's score (* near tie)."""
    c = run["tie_check"].get(step)
    if not c or c.get("noise") is None:
        return "-"
    best = next(p["score"] for p in run["curves"][step] if p["lambda"] == c["best"])
    return f"{c['margin'] / best:.2%} / {c['noise'] / best:.2%}" + (" *" if c["near_tie"] else "")


def rule_picks(check: dict, lambdas: list[float]) -> dict[str, float]:
    """Each near-tie rule's λ between a step's winner and its runner-up."""
    best, second = check["best"], check["runner_up"]
    return {"lowest": best,
            "reference-order": min((best, second), key=lambdas.index),
            "smaller-λ": min(best, second)}


PROTOCOL = ("seqlen", "nsamples", "search_windows", "eval_windows")


def _earlier_runs(args) -> dict:
    """{setting: its runs and block-only perplexities} from `--baseline`, when its protocol is this one's."""
    if not args.baseline:
        return {}
    import json

    old = json.loads(Path(args.baseline).read_text())
    differs = [k for k in PROTOCOL if old["config"][k] != getattr(args, k)]
    if differs or args.probe:
        raise SystemExit(f"--baseline: its {', '.join(differs) or 'probes'} differ from this run's (probes are "
                         "not kept per run: pass --no-probe)")
    return {s["setting"]: {"runs": s["runs"], "block_only_ppl": s["block_only_ppl"]} for s in old["settings"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="wanda:0.7", help="method:sparsity,... (issue 26: six of them)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of the final prune")
    ap.add_argument("--search-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--no-probe", dest="probe", action="store_false")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dtype_fidelity.json"))
    ap.add_argument("--baseline", help="an earlier --out of the same protocol: its variants' runs and "
                                       "evaluations are taken, not run again (the searches are deterministic)")
    args = ap.parse_args()
    earlier = _earlier_runs(args)
    from neuroal.allocation.neuroal import ROUNDING_NOISE, block_candidates, block_lambdas
    from neuroal.models import load_config, resolve_model
    from neuroal.families import family_for

    config = load_config(resolve_model("smollm2-135m"))
    family = family_for(config)
    settings, choice_rows, spread_rows, probe_rows, rule_rows = [], [], [], [], []
    for item in args.settings.split(","):
        method, sparsity = item.split(":")[0], float(item.split(":")[1])
        taken = earlier.get(item, {"runs": {}, "block_only_ppl": {}})
        runs = {**taken["runs"], **{v: in_child(search, method, sparsity, v, args)
                                    for v in args.variants.split(",") if v not in taken["runs"]}}
        lambdas = list(block_lambdas(sparsity))
        candidates = block_candidates(config.num_hidden_layers, sparsity, family.linears)
        block_ppl = {float(lam): ppl for lam, ppl in taken["block_only_ppl"].items()}
        for r in runs.values():
            for lam in {r["tie_check"]["block"]["best"], r["tie_check"]["block"].get("runner_up")} - {None}:
                if lam not in block_ppl:
                    block_ppl[lam] = in_child(evaluate, method, sparsity, candidates[lam], args)["ppl"]
        for variant, r in runs.items():
            if variant not in taken["runs"]:
                r["ppl"] = in_child(evaluate, method, sparsity, r.pop("ratios"), args)["ppl"]
            checks = r["tie_check"]
            choice_rows.append([f"{method} {sparsity:.0%}", variant, f"{r['lambda_block']:g}",
                                "-" if r["lambda_row"] is None else f"{r['lambda_row']:g}",
                                *(_lead(r, step) for step in ("block", "row")), r["ppl"], r["search_s"]])
            block = checks["block"]
            if block.get("runner_up") is not None:
                picks = rule_picks(block, lambdas)
                better = min((block["best"], block["runner_up"]), key=lambda lam: block_ppl[lam])
                rule_rows.append({"setting": item, "variant": variant, "near_tie": block["near_tie"],
                                  "ppl": {str(lam): block_ppl[lam] for lam in (block["best"], block["runner_up"])},
                                  "picks": picks, "right": {rule: picks[rule] == better for rule in RULES}})
        spread = candidate_spread(runs)
        spread_rows.append({"setting": item, "candidates": spread, "lead_movement": lead_movement(runs)})
        if args.probe:
            probe_rows += [{"setting": item, **row} for row in where_noise_enters({v: r.pop("probe") for v, r in runs.items()})]
        settings.append({"setting": item, "runs": {v: {k: x for k, x in r.items() if k != "probe"} for v, r in runs.items()},
                         "block_only_ppl": {str(k): v for k, v in block_ppl.items()}})
        write_json(Path(args.out), {"config": vars(args), "machine": machine(), "settings": settings,  # each setting
                                    "spread": spread_rows, "where_noise_enters": probe_rows, "rules": rule_rows})

    print_table(f"NeuroAL choices by variant (SmolLM2, c4 {args.nsamples}x{args.seqlen}, search on the first "
                f"{args.search_windows}; WikiText-2 ppl in float32 over {args.eval_windows} windows)",
                ["setting", "variant", "λ block", "λ row", "block lead / noise", "row lead / noise", "ppl", "search s"],
                choice_rows)
    print_table("Scores across variants: spread of each finished block-step candidate's score (max - min over "
                "mean), and the most a pairwise lead moved (the tie check's rounding floor is "
                f"{ROUNDING_NOISE:.1%})",
                ["setting", "candidates", "median spread", "max spread", "lead moved: block", "lead moved: row"],
                [[s["setting"], len(s["candidates"]), f"{median([c['spread'] for c in s['candidates']]):.2%}",
                  f"{max((c['spread'] for c in s['candidates']), default=float('nan')):.2%}",
                  *(f"{s['lead_movement'][k]:.2%}" if k in s["lead_movement"] else "-" for k in ("block", "row"))]
                 for s in spread_rows])
    if probe_rows:
        print_table("Where the noise enters (vs float32, 2 threads; relative drift)",
                    ["setting", "variant", "block", "input", "Wanda norms", "mask flips", "metric"],
                    [[p["setting"], p["variant"], p["block"], f"{p['input_drift']:.2e}", f"{p['norm_drift']:.2e}",
                      f"{p['mask_flips']:.2e}", f"{p['metric_drift']:.2e}"] for p in probe_rows])
    if rule_rows:
        print_table("Block step, winner vs runner-up: their block-only allocations' held-out ppl (float32)",
                    ["setting", "variant", "winner λ: ppl", "runner-up λ: ppl", "near tie", "rules that pick the better"],
                    [[r["setting"], r["variant"], *(f"{lam}: {ppl:.1f}" for lam, ppl in r["ppl"].items()),
                      "yes" if r["near_tie"] else "no", ", ".join(k for k, ok in r["right"].items() if ok) or "-"]
                     for r in rule_rows])
        record = {rule: (sum(r["right"][rule] for r in rule_rows), len(rule_rows)) for rule in RULES}
        ties = [r for r in rule_rows if r["near_tie"]]
        record_ties = {rule: (sum(r["right"][rule] for r in ties), len(ties)) for rule in RULES}
        print_table("Near-tie rules, block step: picks with the better held-out ppl (winner vs runner-up)",
                    ["rule", "all steps", "flagged near ties"],
                    [[rule, f"{record[rule][0]}/{record[rule][1]}", f"{record_ties[rule][0]}/{record_ties[rule][1]}"]
                     for rule in RULES])


if __name__ == "__main__":
    main()
