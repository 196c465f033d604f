"""Issue 25's comparison as one table: the results store of `neuroal grid grids/methods-smollm2.yaml`.

Every method (magnitude, Wanda, RIA, SparseGPT, APT, D²Prune) at 50%, 70% and 2:4, uniform and with
NeuroAL (N:M takes uniform only), on SmolLM2-135M: WikiText-2 perplexity and zero-shot accuracy, with the
chosen λs. Prints a markdown table (the README's) and writes benchmarks/results/methods_smollm2.json.

    neuroal grid grids/methods-smollm2.yaml --store runs/methods-smollm2     # ~2 h on 2 cores
    neuroal eval --model smollm2-135m --eval wikitext2 --seqlen 256 --eval-windows 64 --zeroshot arc_easy,boolq \
        --zeroshot-limit 200 --store runs/methods-smollm2                          # the dense row
    python benchmarks/methods_smollm2.py runs/methods-smollm2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from _common import ROOT, machine, write_json

METHODS = ["magnitude", "wanda", "ria", "sparsegpt", "apt", "d2prune"]
SETTINGS = [(0.5, "unstructured", "50%"), (0.7, "unstructured", "70%"), (0.5, "2:4", "2:4")]
TASKS = ["arc_easy", "boolq"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="the grid's results store")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods_smollm2.json"))
    args = parser.parse_args()

    from orchestrator.results.store import read_store

    rows = read_store(args.store).table.to_pylist()
    cells: dict[tuple, dict] = {}
    protocols: dict[str, str] = {}
    for r in rows:
        key = (r["method"], r["top_up"], r["sparsity"] if r["pattern"] == "unstructured" else 0.5, r["pattern"])
        if r["method"] == "dense":  # `neuroal eval smollm2-135m ... --store` (the same evaluations)
            key = ("dense", "none", 0.5, "unstructured")
        cell = cells.setdefault(key, {})
        if r["metric"] == "perplexity":
            cell[r["task"]] = r["value"]
            protocols[r["task"]] = r["protocol"]
        elif r["task"] in TASKS and r["metric"] == "acc":
            cell[r["task"]] = r["value"]
            protocols[r["task"]] = r["protocol"]
        elif r["task"] == "prune":
            cell["lambda"] = (r["lambda_block"], r["lambda_row"])
            cell["sparsity_actual"] = r["sparsity_actual"]
        elif r["metric"] == "error":
            cell["error"] = r.get("note") or "failed"

    def ppl(v):
        return "–" if v is None else ("inf" if not math.isfinite(v) else f"{v:,.1f}")

    def acc(cell):  # each task's own accuracy: BoolQ sits near chance on this model, a mean would hide arc_easy
        vals = [cell.get(t) for t in TASKS]
        return "–" if any(v is None for v in vals) else " / ".join(f"{v:.3f}" for v in vals)

    header = (["method", "top-up"] + [f"{label} ppl" for *_, label in SETTINGS]
              + [f"{label} {' / '.join(TASKS)}" for *_, label in SETTINGS])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = []
    dense = cells.get(("dense", "none", 0.5, "unstructured"))
    if dense:
        lines.append("| dense | – | " + " | ".join([ppl(dense.get("wikitext2"))] * 3 + [acc(dense)] * 3) + " |")
        table.append({"method": "dense", **dense})
    for method in METHODS:
        for top_up in ("uniform", "neuroal"):
            got = [cells.get((method, top_up, s, p), {}) for s, p, _ in SETTINGS]
            if not any(got):
                continue
            ppls = [ppl(c.get("wikitext2")) if c else "–" for c in got]
            accs = [acc(c) if c else "–" for c in got]
            lines.append("| " + " | ".join([method, top_up] + ppls + accs) + " |")
            table.append({"method": method, "top_up": top_up,
                          **{label: got[i] for i, (*_, label) in enumerate(SETTINGS)}})
    print("\n".join(lines))
    print()
    for task, text in sorted(protocols.items()):
        print(f"{task}: {text}")
    write_json(Path(args.out), {"machine": machine(), "store": str(args.store), "protocols": protocols,
                                "rows": table, "markdown": "\n".join(lines)})


if __name__ == "__main__":
    sys.exit(main())
