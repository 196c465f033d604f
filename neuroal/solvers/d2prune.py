"""D²Prune: a dual Taylor expansion for the mask, SparseGPT's update, and no update for chosen q/k/v.

Paper: L. Xiong et al., "D²Prune: Sparsifying Large Language Models via Dual Taylor Expansion and
Attention Distribution Awareness", AAAI 2026 (arXiv 2601.09176). Reference code: cquxl/D2Prune,
`prune/d2prune_utils.py` (`D2SparseGPT`, `D2Wanda`) and `prune/prune_llama.py` (`D2Prune_LLAMA`),
run as in its `scripts/*.sh` (`--d2_sparsegpt --d2_wanda --s 1500 --r1 1 --r2 0`).

The error of pruning weight w_ij under perturbations of both the weight and the activation is
expanded to second order in each (paper eq. for δE):

    δE = λ₁ y wᵀx + λ₂ xᵀ H₂₂ x + ½ δwᵀ H₁₁ δw

which the reference turns into a per-weight mask metric (y_i and x_j the per-window L2 norms of the
linear's output channel i and input channel j, accumulated as in `neuroal.stats`, divided by s):

    D2SparseGPT:  w²/[U]_jj²  + r1 · (y_i/s) |w| (x_j/s) − r2 · w² (x_j/s)²     (U: SparseGPT's factor)
    D2Wanda:      w² · ‖x_j‖² + r1 · (y_i/s) |w| (x_j/s) − r2 · w² (x_j/s)²     (‖x_j‖²: Wanda's scaler_row)

with r1 = 1, r2 = 0, s = 1500 (the reference's defaults and every script's). D2SparseGPT runs
SparseGPT's column sweep (`neuroal.solvers.sparsegpt`, its mask metric replaced, recomputed on the
current weights of every block or N:M group, as the reference) and its OBS update; its x_j come from
the input scaled by √(2/n) as for the Hessian (`LinearStats.x_l2_h`), D2Wanda's from the raw input.

Attention distribution awareness. The paper chooses, per model, which of q/k/v keep SparseGPT's
weight update and which are only masked, by minimising perplexity plus a KL term between the dense
and sparse attention distributions. The reference code has no such search: the choice is a fixed
argument, `target_layer_names`, whose layers are pruned by D2Wanda (mask, no update) while every other
linear gets D2SparseGPT; its scripts pass `['self_attn.v_proj']` for LLaMA-2-7B/70B and LLaMA-3-8B/70B
and `['self_attn.k_proj']` for OPT-125m and LLaMA-2-13B. Deviations here, and why:

- `NO_UPDATE` = ("self_attn.v_proj",) for every family (the LLaMA scripts' choice; OPT's k_proj
  is one argument away, `no_update=`); no KL/perplexity search runs. The search the paper describes
  needs the attention probabilities of every candidate, which the reference does not compute either.
- Fused projections (Phi-3's qkv_proj, GPT-NeoX's query_key_value) and families without attention
  (Mamba) have no separate v_proj: every linear gets the update there.
- The weight update is SparseGPT's OBS update, as in the reference code (the paper derives the
  update from the same expansion; the code changes only the mask metric).
- Per-row ratios (a top-up giving row sparsities) choose each row's count inside every block, as
  our SparseGPT does; the reference has no per-row mode.
- The reference's options `--kmeans` / `--auto_s` (s from the data) and its own OWL variant
  (`--dsm`) are not reproduced: allocators are our top-ups.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuroal import masks
from neuroal.solvers.sparsegpt import Saliency, sparsegpt_prune
from neuroal.solvers.hessian import prepare

S = 1500.0  # the reference's activation scale s (`cfg/model.yaml`, every script)
R1 = 1.0  # λ₁: first-order activation term y·w·x
R2 = 0.0  # λ₂: second-order activation term w²x²
NO_UPDATE = ("self_attn.v_proj",)  # masked without a weight update (the reference's `target_layer_names`)


def _dual_terms(W: Tensor, y: Tensor, x: Tensor, r1: float, r2: float, s: float) -> Tensor:
    """r1 · (y/s) |W| (x/s) − r2 · W² (x/s)²  for W [out, c], y [out], x [c]."""
    ys, xs = (y / s).reshape(-1, 1), (x / s).reshape(1, -1)
    tmp = r1 * (ys * W.abs() * xs)
    if r2:
        tmp -= r2 * (W**2 * xs**2)
    return tmp


def d2_saliency(y: Tensor, x: Tensor, *, r1: float = R1, r2: float = R2, s: float = S) -> Saliency:
    """D2SparseGPT's mask metric for `sparsegpt_prune(saliency=…)`: w²/d² + the dual terms.

    Args:
        y: [out] output norms (`LinearStats.y_l2`), x: [in] input norms (`LinearStats.x_l2_h`).
    """

    def saliency(W1: Tensor, d: Tensor, j: int) -> Tensor:  # W1 [out, c] from column j, d [c]
        return W1**2 / d.reshape(1, -1) ** 2 + _dual_terms(W1, y, x[j : j + W1.shape[1]], r1, r2, s)

    return saliency


def d2wanda_score(W: Tensor, scaler_row: Tensor, y: Tensor, x: Tensor, *, r1: float = R1, r2: float = R2,
                  s: float = S) -> Tensor:
    """D2Wanda's metric [out, in] (lowest pruned): W² · scaler_row + the dual terms.

    Args:
        W: [out, in]; scaler_row: [in] Wanda's ‖x_j‖² (the square of its input norm); y: [out]
        output norms (`y_l2`); x: [in] raw input norms (`x_l2`).
    """
    W = W.to(torch.float32)
    return W**2 * scaler_row.reshape(1, -1) + _dual_terms(W, y, x, r1, r2, s)


def _check(stats) -> None:
    if stats is None or stats.y_l2 is None or stats.x_l2 is None or stats.H is None:
        raise ValueError("D²Prune needs statistics of kinds HESSIAN, NORMS and D2_NORMS, with the linear's "
                         "outputs recorded (as `neuroal.stats.collect` does)")


@torch.no_grad()
def d2prune(
    W: Tensor,
    stats,
    sparsity: float | Tensor,
    *,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    linear: str = "",
    no_update: tuple[str, ...] = NO_UPDATE,
    r1: float = R1,
    r2: float = R2,
    s: float = S,
) -> Tensor:
    """New weights for one linear by D²Prune: masked only if `linear` is in `no_update`, else swept.

    Registered as `--method d2prune` (e.g. ``neuroal prune --method d2prune --top-up owl --sparsity 0.6``;
    a grid's ``methods: [d2prune]``); with `--top-up neuroal` it runs the block step only, as SparseGPT.

    Args:
        W: [out, in] weights.
        stats: its `LinearStats` with HESSIAN, NORMS and D2_NORMS.
        sparsity: fraction to remove (float) or per-row fractions [out]; ignored for N:M.
        prunen, prunem: N:M pattern, 0 for unstructured.
        linear: the linear's name in its block (e.g. "self_attn.v_proj").
        no_update: names masked by D2Wanda without a weight update.
        r1, r2, s: the metric's λ₁, λ₂ and activation scale.

    Returns:
        The new [out, in] weights in W's dtype, exact zeros where pruned.
    """
    _check(stats)
    if linear in no_update:
        score = d2wanda_score(W, stats.scaler_row, stats.y_l2, stats.x_l2, r1=r1, r2=r2, s=s)
        if prunen:
            mask = masks.nm_mask(score, prunen, prunem)
        elif isinstance(sparsity, Tensor):
            mask = masks.row_mask_ratios(score, sparsity)
        else:
            mask = masks.row_mask(score, sparsity)
        return W.masked_fill(mask, 0)
    return sparsegpt_prune(W, stats.hessian, sparsity, prunen=prunen, prunem=prunem, blocksize=blocksize,
                           percdamp=percdamp, saliency=d2_saliency(stats.y_l2, stats.x_l2_h, r1=r1, r2=r2, s=s))


@torch.no_grad()
def d2_initial_metric(W: Tensor, stats, *, percdamp: float = 0.01, r1: float = R1, r2: float = R2,
                      s: float = S) -> Tensor:
    """D2SparseGPT's metric on the dense weights [out, in] (the mask a refiner such as DSnoT starts from)."""
    _check(stats)
    W32, U = prepare(W, stats.hessian, percdamp)
    return d2_saliency(stats.y_l2, stats.x_l2_h, r1=r1, r2=r2, s=s)(W32, torch.diag(U), 0)
