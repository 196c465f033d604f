"""Plots of one run: the λ search's score per step (when it searched), and the per-block sparsity it chose."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


logger = logging.getLogger(__name__)


def lambda_curves(run: dict, path: Path) -> Path | None:
    curves = run.get("lambda_curves") or {}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (step, points) in zip(axes[0], curves.items()):
        lam = [p["lambda"] for p in points if p["complete"]]
        score = [p["score"] for p in points if p["complete"]]
        ax.plot(lam, score, "o-", label="scored")
        stopped = [(p["lambda"], p["score"]) for p in points if not p["complete"]]
        if stopped:
            ax.scatter(*zip(*stopped), marker="^", color="grey", label="stopped early (lower bound)")
        best = run.get("lambda_block" if step == "block" else "lambda_row")
        if best is not None:
            ax.axvline(best, color="red", ls="--", lw=1, label=f"chosen λ={best:g}")
        ax.set_xlabel("λ")
        ax.set_ylabel("alignment score (lower is better)")
        ax.set_title(f"{run['spec']['top_up']} {step} step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def block_sparsity(run: dict, path: Path) -> Path:
    planned = run["block_sparsity_planned"]
    target = run["sparsity_target"]
    x = np.arange(len(planned))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(x, planned, "o-", label=f"{run['spec']['top_up']} (chosen)")
    ax.axhline(target, color="grey", ls=":", label="uniform")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_title("per-block sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_plots(run: dict, folder: Path) -> list[Path]:
    out = [block_sparsity(run, folder / "block_sparsity.png")]
    p = lambda_curves(run, folder / "lambda_curves.png")
    if p:
        out.append(p)
    return out
