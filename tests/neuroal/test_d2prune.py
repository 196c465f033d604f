"""D²Prune: its statistics (the reference wrappers' recurrences), its mask metric by hand, its sweep
against a straightforward column-by-column implementation, the no-update q/k/v path, N:M, registry."""

import math

import pytest
import torch
from torch import nn

from neuroal.allocation.neuroal import steps
from neuroal.families import FAMILIES
from neuroal.methods import METHODS, Pattern, prune_linear
from neuroal.refiners.dsnot import initial_metric
from neuroal.solvers.d2prune import NO_UPDATE, d2_initial_metric, d2prune
from neuroal.solvers.sparsegpt import sparsegpt_prune
from neuroal.stats import D2_NORMS, HESSIAN, NORMS, LinearStats, StopForward, collect

D2 = METHODS.get("d2prune")


# ------------------------------------------------------------------------------------------- statistics


def reference_recurrences(X, Y):
    """cquxl/D2Prune `D2SparseGPT.add_batch` / `D2Wanda.add_batch` (s = 1), one window per call."""
    n, y, dx_sgpt, dx_wanda = 0, 0.0, 0.0, 0.0
    for x_w, y_w in zip(X, Y):  # x_w [tokens, in], y_w [tokens, out]
        tmp = 1
        y, dx_sgpt, dx_wanda = (v * (n / (n + tmp)) for v in (y, dx_sgpt, dx_wanda))
        n += tmp
        inp = x_w.t().float()
        y = y + torch.norm(y_w.reshape(-1, y_w.shape[-1]), p=2, dim=0)
        dx_wanda = dx_wanda + torch.norm(inp, p=2, dim=1)
        dx_sgpt = dx_sgpt + torch.norm(math.sqrt(2 / n) * inp, p=2, dim=1)
    return y, dx_sgpt, dx_wanda


class Two(nn.Module):
    """Two linears on the same input (as q and k): input statistics shared, output statistics their own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.a(x).sum(-1) + self.b(x).sum(-1)


def test_statistics_replay_the_reference_recurrences():
    torch.manual_seed(1)
    X = torch.randn(3, 5, 4)  # 3 windows of 5 tokens
    mod = Two()
    with collect({"a": mod.a, "b": mod.b}, frozenset({D2_NORMS, NORMS, HESSIAN}), stop_after="b") as st:
        with pytest.raises(StopForward):
            mod(X)
    for name, lin in (("a", mod.a), ("b", mod.b)):
        y, dx_sgpt, dx_wanda = reference_recurrences(X, lin(X).detach())
        assert torch.allclose(st[name].y_l2, y, rtol=1e-6)
        assert torch.allclose(st[name].x_l2_h, dx_sgpt, rtol=1e-6)
        assert torch.allclose(st[name].x_l2, dx_wanda, rtol=1e-6)
        assert st[name].n_out_windows == st[name].n_windows == 3
    assert st["a"].y_l2.shape == (3,) and st["b"].y_l2.shape == (5,)  # not copied from the twin
    # window k of N weighs k/N (the reference's recurrence, reproduced as is)
    closed = sum((k + 1) / 3 * torch.norm(X[k], dim=0) for k in range(3))
    assert torch.allclose(st["a"].x_l2, closed, rtol=1e-6)


# ------------------------------------------------------------------------------------------- by hand

W = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                  [2.0, 1.0, -1.0, -3.0]])


def hand_stats(h, y, x_h, x, scaler_row):
    st = LinearStats(kinds=frozenset({HESSIAN, NORMS, D2_NORMS}))
    st.H = torch.diag(torch.tensor(h))
    st.y_l2, st.x_l2_h, st.x_l2 = torch.tensor(y), torch.tensor(x_h), torch.tensor(x)
    st.scaler_row = torch.tensor(scaler_row)
    return st


# H diagonal: U = diag(1/sqrt(h)), so w²/U_jj² = w²·h_j and the OBS update moves no other weight
ST = hand_stats(h=[4.0, 1.0, 1.0, 0.25], y=[1.0, 2.0], x_h=[0.0, 1.0, 3.0, 2.0], x=[1.0, 0.0, 2.0, 1.0],
                scaler_row=[1.0, 4.0, 1.0, 1.0])


def test_d2sparsegpt_mask_by_hand():
    """metric = w²·h_j + (y_i/s)|w|(x_j/s), s = 1:
        row 0: 4 + 0, 4 + 2, 9 + 9, 0.0625 + 1  = 4, 6, 18, 1.0625
        row 1: 16 + 0, 1 + 2, 1 + 6, 2.25 + 12  = 16, 3, 7, 14.25
    threshold = 5th smallest (index int(8 · 0.5) = 4, SparseGPT's rule, `<=`) = 7: five pruned."""
    new = d2prune(W, ST, 0.5, percdamp=0.0, s=1.0)
    assert (new == 0).tolist() == [[True, True, False, True],
                                   [False, True, True, False]]
    assert torch.equal(new[new != 0], W[new != 0])  # diagonal H: kept weights do not move
    # SparseGPT's own metric (w²·h_j: 4, 4, 9, .0625 / 16, 1, 1, 2.25) prunes r1c3 and keeps r1c2
    plain = sparsegpt_prune(W, ST.H, 0.5, percdamp=0.0)
    assert (plain == 0)[1].tolist() == [False, True, True, True]


def test_d2wanda_no_update_mask_by_hand():
    """v_proj: metric = w²·scaler_row + (y_i/s)|w|(x_j/s), per row, no update:
        row 0: 1 + 1, 16 + 0, 9 + 6, 0.25 + 0.5 = 2, 16, 15, 0.75   -> prune c3, c0
        row 1: 4 + 4, 4 + 0, 1 + 4, 9 + 6      = 8, 4, 5, 15       -> prune c1, c2 (Wanda alone: c2, c0)"""
    new = d2prune(W, ST, 0.5, linear="self_attn.v_proj", s=1.0)
    assert (new == 0).tolist() == [[True, False, False, True],
                                   [False, True, True, False]]
    assert torch.equal(new[new != 0], W[new != 0])
    assert NO_UPDATE == ("self_attn.v_proj",)


def test_dsnot_starts_from_d2prunes_metric():
    expect = torch.tensor([[4.0, 6.0, 18.0, 1.0625], [16.0, 3.0, 7.0, 14.25]])
    assert torch.allclose(d2_initial_metric(W, ST, percdamp=0.0, s=1.0), expect)
    assert torch.equal(initial_metric(W, ST, D2), d2_initial_metric(W, ST))


# ------------------------------------------------------------------------------------------- the sweep


def straightforward(W, H, y, x, ratio, *, n=0, m=0, blocksize=128, percdamp=0.01, r1=1.0, r2=0.0, s=1500.0):
    """D2SparseGPT one column at a time in float64 with explicit inverses of the remaining columns' Hessian:
    at column j the free columns are F = j.., the saliency of w_ij is w²/[H_FF⁻¹]_00 + the dual terms
    (masks chosen per block of columns, or per group of M, on the current weights), and pruning
    column j moves the free ones by −(w − q)/[H_FF⁻¹]_00 · [H_FF⁻¹]_{0,:}."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    H += percdamp * H.diag().mean() * torch.eye(cols, dtype=H.dtype)
    hinv00 = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)], dtype=H.dtype)
    ys, xs = y.double().reshape(-1, 1) / s, x.double().reshape(1, -1) / s

    def saliency(j, c):
        Wc = W[:, j : j + c]
        return Wc**2 / hinv00[j : j + c] + r1 * ys * Wc.abs() * xs[:, j : j + c] - r2 * Wc**2 * xs[:, j : j + c] ** 2

    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if n and j % m == 0:
            idx = torch.topk(saliency(j, m), n, dim=1, largest=False)[1]
            mask[:, j : j + m].scatter_(1, idx, True)
        elif not n and j % blocksize == 0:
            tmp = saliency(j, min(blocksize, cols - j))
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * ratio)]
            mask[:, j : j + tmp.shape[1]] = tmp <= thresh
        Hinv = torch.linalg.inv(H[j:, j:])
        err = torch.where(mask[:, j], W[:, j], 0.0)  # w − q
        W[:, j:] -= (err / Hinv[0, 0]).reshape(-1, 1) * Hinv[0].reshape(1, -1)
        W[:, j] = torch.where(mask[:, j], 0.0, W[:, j])
    return W


def random_layer(out=6, cols=16, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(cols, out)
    X = torch.randn(3, 10, cols)  # 30 tokens > 16 columns: H positive definite
    with collect({"lin": lin}, D2.needs) as st:
        lin(X)
    return lin.weight.data.clone(), st["lin"]


@pytest.mark.parametrize("case", [dict(), dict(blocksize=8), dict(n=2, m=4), dict(n=4, m=8)])
def test_the_sweep_equals_a_straightforward_implementation(case):
    Wr, st = random_layer()
    n, m, blocksize = case.get("n", 0), case.get("m", 0), case.get("blocksize", 128)
    knobs = dict(r1=1.0, r2=0.05, s=1.0)  # s small enough for both dual terms to change choices
    new = d2prune(Wr, st, 0.5, prunen=n, prunem=m, blocksize=blocksize, **knobs)
    ref = straightforward(Wr, st.H, st.y_l2, st.x_l2_h, 0.5, n=n, m=m, blocksize=blocksize, **knobs)
    assert torch.equal(new == 0, ref == 0)
    assert torch.allclose(new.double(), ref, atol=1e-4, rtol=1e-4)
    sgpt = sparsegpt_prune(Wr, st.H, 0.5, prunen=n, prunem=m, blocksize=blocksize)
    assert not torch.equal(new == 0, sgpt == 0)  # the dual terms did change the mask
    # at the reference's s = 1500 they are ~1e-6 of w²/[U]_jj² here (tiny activations): SparseGPT's mask
    assert torch.equal(d2prune(Wr, st, 0.5, prunen=n, prunem=m, blocksize=blocksize) == 0, sgpt == 0)


@pytest.mark.parametrize("linear", ["self_attn.q_proj", "self_attn.v_proj"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_masks_are_valid(linear, n, m):
    Wr, st = random_layer(out=8, cols=32, seed=2)
    new = prune_linear(Wr, st, n / m, D2, pattern=Pattern(n, m), linear=linear)
    assert ((new == 0).reshape(8, -1, m).sum(-1) == n).all()
    kept = new != 0
    assert torch.equal(new[kept], Wr[kept]) == (linear == "self_attn.v_proj")  # only v is not updated


def test_per_row_ratios():
    Wr, st = random_layer(out=4, cols=16, seed=3)
    ratios = torch.tensor([0.25, 0.5, 0.5, 0.75])
    for linear in ("mlp.up_proj", "self_attn.v_proj"):
        new = d2prune(Wr, st, ratios, linear=linear)
        assert (new == 0).sum(1).tolist() == [4, 8, 8, 12]


def test_missing_output_statistics_fail_clearly():
    Wr, st = random_layer()
    st.y_l2 = None
    with pytest.raises(ValueError, match="D2_NORMS"):
        d2prune(Wr, st, 0.5)


def test_registered_as_a_solver_with_the_block_step_only():
    assert D2.solver is not None and D2.score is None
    assert D2.needs == frozenset({HESSIAN, NORMS, D2_NORMS})
    llama = next(f for f in FAMILIES if f.name == "llama")
    s = steps("both", D2, llama)
    assert (s.block, s.row) == (True, False) and "block step only" in s.notes[0]
