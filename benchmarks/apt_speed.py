"""Wall time per layer: APT vs SparseGPT on the SmolLM2-135M linear shapes and one 4096×4096 layer.

For every shape [out, in] and mode (unstructured 50 %, 2:4) both solvers prune the same random W
with the same H = 2XᵀX/n from correlated Gaussian inputs, at blocksize 128, percdamp 0.01. Runs
alternate APT / SparseGPT so that load from other processes hits both alike; the table reports
the median of the repeats and the APT / SparseGPT ratio of the medians, and the JSON keeps every
sample. The reconstruction error ratio (APT / SparseGPT, ‖ΔW·X‖²) of the first repeat is
reported as a sanity check.

    python benchmarks/apt_speed.py [--quick] [--repeats N] [--threads T] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from neuroal.solvers.apt import apt_prune
from neuroal.solvers.sparsegpt import sparsegpt_prune

SHAPES = {  # name -> [out, in]
    "q_proj/o_proj 576x576": (576, 576),
    "k_proj/v_proj 192x576": (192, 576),
    "gate/up_proj 1536x576": (1536, 576),
    "down_proj 576x1536": (576, 1536),
    "7B-class 4096x4096": (4096, 4096),
}
MODES = {"50%": dict(sparsity=0.5), "2:4": dict(sparsity=0.0, prunen=2, prunem=4)}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "apt_speed.json"


def make_layer(out: int, inp: int, seed: int = 0):
    """W [out, in] ~ N(0, 1/in), X [n, in] Gaussian mixed through a random dense map, H = 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    n = max(inp, 1024)
    W = torch.randn(out, inp, generator=g) / inp**0.5
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + 0.5 * torch.eye(inp)  # correlated channels
    X = (torch.randn(n, inp, generator=g) @ mix) * (0.5 + torch.rand(inp, generator=g))
    return W, X, 2 * X.T @ X / n


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def recon_error(W, W_new, X) -> float:
    return ((W - W_new).double() @ X.double().T).pow(2).sum().item()


def run(shapes: dict, repeats: int, big_repeats: int, blocksize: int) -> list[dict]:
    rows = []
    for shape_name, (out, inp) in shapes.items():
        W, X, H = make_layer(out, inp)
        n_rep = big_repeats if out * inp >= 4096 * 4096 else repeats
        for mode, kw in MODES.items():
            t_apt, t_sgpt, err_ratio = [], [], None
            for r in range(n_rep):
                ta, Wa = timed(apt_prune, W, H, blocksize=blocksize, **kw)
                ts, Ws = timed(sparsegpt_prune, W, H, blocksize=blocksize, **kw)
                t_apt.append(ta)
                t_sgpt.append(ts)
                if r == 0:
                    err_ratio = recon_error(W, Wa, X) / recon_error(W, Ws, X)
            row = dict(
                shape=shape_name, out=out, inp=inp, mode=mode, repeats=n_rep,
                apt_median_s=statistics.median(t_apt), sparsegpt_median_s=statistics.median(t_sgpt),
                apt_s=t_apt, sparsegpt_s=t_sgpt, error_ratio=err_ratio,
            )
            row["ratio"] = row["apt_median_s"] / row["sparsegpt_median_s"]
            rows.append(row)
            print(
                f"{shape_name:24s} {mode:4s} n={n_rep:<2d} APT {row['apt_median_s']:8.3f}s  "
                f"SparseGPT {row['sparsegpt_median_s']:8.3f}s  ratio {row['ratio']:5.2f}  "
                f"err APT/SparseGPT {err_ratio:.3f}",
                flush=True,
            )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats (1 for 4096×4096) instead of 5 (3)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats for the SmolLM2 shapes")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--skip-big", action="store_true", help="leave out the 4096×4096 layer")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # a benchmark process setting, not a library one
    repeats = args.repeats or (2 if args.quick else 5)
    big_repeats = 1 if args.quick else 3
    shapes = {k: v for k, v in SHAPES.items() if not (args.skip_big and v == (4096, 4096))}
    rows = run(shapes, repeats, big_repeats, args.blocksize)
    print()
    print(f"{'shape':24s} {'mode':4s} {'APT s':>9s} {'SparseGPT s':>12s} {'APT/SGPT':>9s}")
    for r in rows:
        print(f"{r['shape']:24s} {r['mode']:4s} {r['apt_median_s']:9.3f} {r['sparsegpt_median_s']:12.3f} {r['ratio']:9.2f}")
    result = dict(
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
        processor=platform.processor(), blocksize=args.blocksize, rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
