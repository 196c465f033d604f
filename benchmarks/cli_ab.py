"""A `neuroal` command's wall clock at an earlier commit and at the working tree, interleaved, one sitting.

The earlier commit is checked out as a git worktree and run with `python -m orchestrator` from it
(PYTHONPATH first, so it shadows the editable install; the local Ray workers inherit it). The
command's stdout is kept per run, so results can be compared too.

    python benchmarks/cli_ab.py --before aed5b04 --name zeroshot_cli -- \\
        eval --model smollm2-135m --zeroshot arc_easy,hellaswag --zeroshot-limit 100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, median, print_table, write_json


def timed(root: Path, args: list[str], store: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args, "--store", str(store)], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - t, out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the baseline commit")
    ap.add_argument("--name", required=True, help="results/<name>.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the neuroal arguments")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with tempfile.TemporaryDirectory(prefix="neuroal-ab-") as tmp:
        base = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            roots = {f"before ({args.before})": base, "after (working tree)": ROOT}
            times, outputs = {k: [] for k in roots}, {}
            for r in range(args.repeats):
                for label, root in roots.items():
                    dt, outputs[label] = timed(root, command, Path(tmp) / f"store-{r}-{len(times[label])}")
                    times[label].append(dt)
                    print(f"{label}: {dt:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    before = median(next(iter(times.values())))
    rows = [[k, median(v), before / median(v)] for k, v in times.items()]
    print_table(f"neuroal {' '.join(command)} (wall clock, medians of {args.repeats})",
                ["code", "s", "x before"], rows)
    write_json(ROOT / "benchmarks" / "results" / f"{args.name}.json",
               {"command": ["neuroal", *command], "before": args.before, "seconds": times, "stdout": outputs,
                "machine": machine()})


if __name__ == "__main__":
    main()
