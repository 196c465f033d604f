"""Wall time and peak memory of Wanda and SparseGPT on SmolLM2: batched block unit vs a per-window loop.

The baseline is the papers' code style (Wanda `prune_wanda`, SparseGPT `llama_sequential`): each
block runs the calibration windows one at a time through the layer, with hooks that update running
statistics per window, then prunes, then runs the windows one at a time again for the next block's
inputs. Ours is `neuroal.block.prune_block`: the windows in micro-batches (2k tokens on CPU, 32k on
GPU), the dense pass stopped after the last linear's input is recorded, kthvalue row masks; the
statistics replay the reference's per-window running means, so both produce the same masks
(checked: agreement 1.0). Each configuration runs in its own process (peak RSS is its own);
per-block times give the medians.

    python benchmarks/prune_speed.py                 # 128 windows x 512 tokens (the issue's size)
    python benchmarks/prune_speed.py --nsamples 16 --seqlen 256 --blocks 6   # quick
"""

from __future__ import annotations

import argparse
import time

from _common import DATA_DIR, ROOT, in_child, machine, median, print_table, write_json


def _setup(nsamples, seqlen):
    import torch

    from neuroal.data import calibration_windows
    from neuroal.block_forward import capture_block_inputs
    from neuroal.families import get_blocks
    from neuroal.models import load_full, load_tokenizer, resolve_model

    folder = resolve_model("smollm2-135m")
    model, family = load_full(folder)
    ids, _ = calibration_windows("c4", load_tokenizer(folder), nsamples, seqlen, 0, DATA_DIR)
    inputs = capture_block_inputs(model, family, ids)
    return torch, model, family, get_blocks(model, family), inputs


def run_ours(method, nsamples, seqlen, n_blocks):
    from neuroal import block as B

    torch, model, family, blocks, inputs = _setup(nsamples, seqlen)
    hidden, kwargs = inputs.hidden, inputs.kwargs
    opts = B.PruneOptions(method=method)
    per_block, masks = [], []
    for b in range(n_blocks):
        t = time.perf_counter()
        hidden, _ = B.prune_block(blocks[b], family, hidden, kwargs, {n: 0.5 for n in family.linears}, opts)
        per_block.append(time.perf_counter() - t)
        masks.append({n: (blocks[b].get_submodule(n).weight == 0) for n in family.linears})
    return {"per_block_s": per_block, "masks": _digest(masks)}


def run_loop(method, nsamples, seqlen, n_blocks):
    from neuroal.block_forward import call_block
    from neuroal.solvers.sparsegpt import sparsegpt_prune

    torch, model, family, blocks, inputs = _setup(nsamples, seqlen)
    inps, kwargs = inputs.hidden.clone(), inputs.kwargs
    outs = torch.zeros_like(inps)
    per_block, masks = [], []
    for b in range(n_blocks):
        t = time.perf_counter()
        layer = blocks[b]
        subset = {n: layer.get_submodule(n) for n in family.linears}
        scaler = {n: torch.zeros(m.in_features) for n, m in subset.items()}
        H = {n: torch.zeros(m.in_features, m.in_features) for n, m in subset.items()}
        count = {"n": 0}

        def hook(name):
            def fn(_m, inp, _out):  # one window per call, as the papers' WrappedGPT / SparseGPT add_batch
                x = inp[0].reshape(-1, inp[0].shape[-1]).float().t()
                n = count[name] if name in count else 0
                if method == "wanda":
                    scaler[name] *= n / (n + 1)
                    scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / (n + 1)
                else:
                    H[name] *= n / (n + 1)
                    x = (2 / (n + 1)) ** 0.5 * x
                    H[name] += x @ x.t()
                count[name] = n + 1

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in subset.items()]
        with torch.no_grad():
            for j in range(nsamples):
                outs[j] = call_block(layer, inps[j].unsqueeze(0), kwargs)[0]
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, m in subset.items():
                W = m.weight.data
                if method == "wanda":
                    score = W.abs() * torch.sqrt(scaler[n]).reshape(1, -1)
                    idx = torch.sort(score, dim=-1, stable=True)[1][:, : int(W.shape[1] * 0.5)]
                    mask = torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)
                    W[mask] = 0
                else:
                    m.weight.data = sparsegpt_prune(W, H[n], 0.5)
            for j in range(nsamples):
                outs[j] = call_block(layer, inps[j].unsqueeze(0), kwargs)[0]
        inps, outs = outs, inps
        per_block.append(time.perf_counter() - t)
        masks.append({n: (layer.get_submodule(n).weight == 0) for n in family.linears})
    return {"per_block_s": per_block, "masks": _digest(masks)}


def _digest(masks):
    """All masks, bit-packed (the parent compares them)."""
    import numpy as np

    return np.packbits(np.concatenate([block[n].numpy().ravel() for block in masks for n in sorted(block)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=30, help="prune the first N blocks (30 = the whole model)")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_speed.json"))
    args = ap.parse_args()
    rows, results = [], []
    for method in args.methods.split(","):
        got = {}
        for impl, fn in (("per-window loop", run_loop), ("batched block", run_ours)):
            out = in_child(fn, method, args.nsamples, args.seqlen, args.blocks)
            got[impl] = out
            results.append({"method": method, "impl": impl, "total_s": sum(out["per_block_s"]),
                            "median_block_s": median(out["per_block_s"]), "peak_rss_mb": out["peak_rss_bytes"] / 2**20,
                            "per_block_s": out["per_block_s"]})
        base, ours = got["per-window loop"], got["batched block"]
        ratio = median(base["per_block_s"]) / median(ours["per_block_s"])
        import numpy as np

        agree = float(np.mean(np.unpackbits(base["masks"]) == np.unpackbits(ours["masks"])))
        results[-1]["mask_agreement"] = results[-2]["mask_agreement"] = agree
        for impl, out in got.items():
            rows.append([method, impl, sum(out["per_block_s"]), median(out["per_block_s"]),
                         out["peak_rss_bytes"] / 2**20, ratio if impl == "batched block" else 1.0,
                         f"{agree:.6f}"])
    print_table(f"SmolLM2-135M, 50%, {args.nsamples} windows x {args.seqlen} tokens, {args.blocks} blocks",
                ["method", "impl", "total s", "median s/block", "peak RSS MB", "speed-up (median)", "mask agreement"], rows)
    write_json(__import__("pathlib").Path(args.out), {"config": vars(args), "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
