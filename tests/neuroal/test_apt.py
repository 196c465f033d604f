"""APT (optimal multi-weight OBS pruning): hand cases, exactness, masks, sparsity, SparseGPT baseline."""

from __future__ import annotations

import itertools

import pytest
import torch

from neuroal.errors import SingularHessianError, SpecError
from neuroal.solvers.apt import apt_prune
from neuroal.solvers.sparsegpt import sparsegpt_prune

MODES = {  # name -> apt/sparsegpt keyword arguments
    "50%": dict(sparsity=0.5),
    "70%": dict(sparsity=0.7),
    "2:4": dict(sparsity=0.0, prunen=2, prunem=4),
    "4:8": dict(sparsity=0.0, prunen=4, prunem=8),
    "per-row": None,  # per-row fractions 0.3 … 0.8 (the NeuroAL row step)
}


def mode_kwargs(mode: str, out: int) -> dict:
    return MODES[mode] or dict(sparsity=torch.linspace(0.3, 0.8, out))

# ------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module single-threaded, then restore the setting.

    These solvers issue many small ops; with two intra-op threads on a busy 2-core machine the
    threads wait on each other and a 576×1536 layer took 30 s instead of 0.6 s.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def correlated_layer(out=64, inp=256, n=512, seed=0):
    """Random W and inputs X with correlated, unevenly scaled channels; H = 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + 0.3 * torch.eye(inp)
    X = torch.randn(n, inp, generator=g) @ mix * (3 * torch.rand(inp, generator=g))  # [n, in]
    return W, X, 2 * X.T @ X / n


def recon_error(W, W_new, X) -> float:
    return ((W.double() - W_new.double()) @ X.double().T).pow(2).sum().item()  # ‖WX − ŴX‖²


def damped(H, percdamp=0.01):
    H = H.double().clone()
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return H


def constrained_optimum(w, H, P):
    """Row w with w_P = 0 and the rest moved optimally: w_K += w_P H_PK H_KK⁻¹ (float64)."""
    w = w.double().clone()
    K = torch.tensor([j for j in range(len(w)) if j not in set(P)], dtype=torch.long)
    P = torch.as_tensor(P, dtype=torch.long)
    if len(K):
        w[K] += w[P] @ H[P][:, K] @ torch.linalg.inv(H[K][:, K])
    w[P] = 0
    return w


def pattern_loss(w, Hinv, P):
    """L(P) = ½ w_P [(H⁻¹)_PP]⁻¹ w_Pᵀ."""
    P = torch.as_tensor(P, dtype=torch.long)
    wP = w.double()[P]
    return 0.5 * (wP @ torch.linalg.solve(Hinv[P][:, P], wP)).item()


# ------------------------------------------------------------------------------ OBS reductions


def test_single_weight_hand_case():
    """|P| = 1: δ = −(w_q / [H⁻¹]_qq) H⁻¹_{:,q} with q = argmin w_q² / [H⁻¹]_qq, by hand."""
    H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    # H⁻¹ = [[3/4, −1/2, 1/4], [−1/2, 1, −1/2], [1/4, −1/2, 3/4]]
    W = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.25, 1.0]])
    # row 0: saliencies 1/(3/4), 4/1, (1/4)/(3/4) -> q = 2, δ = −(0.5/0.75)·[1/4, −1/2, 3/4]
    # row 1: saliencies 1/(3/4), (1/16)/1, 1/(3/4) -> q = 1, δ = −(0.25/1)·[−1/2, 1, −1/2]
    expected = torch.tensor([[1 - 1 / 6, 2 + 1 / 3, 0.0], [-1 + 0.125, 0.0, 1 + 0.125]])
    out = apt_prune(W, H, torch.tensor([0.34, 0.34]), blocksize=3, percdamp=0.0)  # floor(3·0.34) = 1 per row
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_single_weight_per_block_is_sequential_obs():
    """One weight per row per block: each block is an OBS step over its free columns (H_FF)⁻¹."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(32, 6, generator=g) @ (torch.randn(6, 6, generator=g) + torch.eye(6))
    H = 2 * X.T @ X / 32
    W = torch.randn(5, 6, generator=g)
    out = apt_prune(W, H, torch.full((5,), 0.5), blocksize=2, percdamp=0.01)  # floor(2·0.5) = 1 per block
    Hd = damped(H)
    ref = W.double().clone()
    for i1 in range(0, 6, 2):
        Hinv = torch.linalg.inv(Hd[i1:, i1:])  # free columns F = [i1, 6)
        for r in range(5):
            w = ref[r, i1:]
            q = int(torch.argmin(w[:2] ** 2 / torch.diag(Hinv)[:2]))
            w -= w[q] / Hinv[q, q] * Hinv[:, q]
            w[q] = 0
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("mode", ["30%", "50%", "80%", "per-row", "2:4", "1:4", "3:4"])
def test_one_block_is_exact_constrained_optimum(mode):
    """Block = whole layer: every row equals w_K + w_P H_PK H_KK⁻¹ for its mask (primal and dual paths)."""
    W, X, H = correlated_layer(out=12, inp=24, n=96, seed=2)
    kw = {
        "30%": dict(sparsity=0.3), "50%": dict(sparsity=0.5), "80%": dict(sparsity=0.8),
        "per-row": dict(sparsity=torch.linspace(0.0, 1.0, 12)),
        "2:4": dict(sparsity=0, prunen=2, prunem=4), "1:4": dict(sparsity=0, prunen=1, prunem=4),
        "3:4": dict(sparsity=0, prunen=3, prunem=4),
    }[mode]
    out = apt_prune(W, H, blocksize=24, **kw)
    Hd = damped(H)
    for r in range(12):
        P = (out[r] == 0).nonzero().squeeze(1).tolist()
        torch.testing.assert_close(out[r].double(), constrained_optimum(W[r], Hd, P), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_is_brute_force_minimum(n, m):
    """One group per row: the kept pattern has the least L(P) of all C(M,N) and its optimal weights."""
    W, X, H = correlated_layer(out=10, inp=m, n=64, seed=3)
    out = apt_prune(W, H, 0.0, prunen=n, prunem=m)
    Hd = damped(H)
    Hinv = torch.linalg.inv(Hd)
    for r in range(10):
        losses = {P: pattern_loss(W[r], Hinv, P) for P in itertools.combinations(range(m), n)}
        best = min(losses, key=losses.get)
        assert tuple((out[r] == 0).nonzero().squeeze(1).tolist()) == best
        torch.testing.assert_close(out[r].double(), constrained_optimum(W[r], Hd, best), atol=1e-4, rtol=1e-4)


def test_nm_each_group_minimises_its_loss_in_the_block():
    """Several groups in one block: each group's pattern minimises L(P) given the block-start weights."""
    W, X, H = correlated_layer(out=8, inp=16, n=64, seed=4)
    out = apt_prune(W, H, 0.0, prunen=2, prunem=4, blocksize=16)
    Hinv = torch.linalg.inv(damped(H))
    for r, g0 in itertools.product(range(8), range(0, 16, 4)):
        losses = {P: pattern_loss(W[r], Hinv, [g0 + p for p in P]) for P in itertools.combinations(range(4), 2)}
        chosen = tuple((out[r, g0 : g0 + 4] == 0).nonzero().squeeze(1).tolist())
        assert chosen == min(losses, key=losses.get)


# ----------------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("s", [0.0, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("inp", [256, 200])
def test_unstructured_count_is_sparsegpt_rule(s, inp):
    """Float sparsity: per block of b columns exactly min(int(out·b·s) + 1, out·b) zeros (none at s = 0)."""
    W, X, H = correlated_layer(out=32, inp=inp, n=384, seed=5)
    out = apt_prune(W, H, s)
    blocks = [min(128, inp - i) for i in range(0, inp, 128)]
    expected = sum(0 if s <= 0 else min(int(32 * b * s) + 1, 32 * b) for b in blocks)
    assert int((out == 0).sum()) == expected
    assert int((sparsegpt_prune(W, H, s) == 0).sum()) == expected  # same rule as the baseline
    assert torch.isfinite(out).all()


def test_per_row_count_is_exact():
    """Per-row sparsity r: each row has Σ_blocks floor(b·r) zeros."""
    W, X, H = correlated_layer(out=32, inp=200, n=384, seed=6)
    ratios = torch.linspace(0.0, 0.95, 32)
    out = apt_prune(W, H, ratios)
    expected = (128 * ratios).floor() + (72 * ratios).floor()
    assert torch.equal((out == 0).sum(1), expected.long())


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 128), (4, 8, 128), (2, 4, 30), (4, 8, 100)])
def test_nm_exactly_n_zeros_per_group(n, m, blocksize):
    W, X, H = correlated_layer(out=16, inp=96, n=256, seed=7)
    out = apt_prune(W, H, 0.0, prunen=n, prunem=m, blocksize=blocksize)
    zeros = (out == 0).reshape(16, 96 // m, m).sum(2)
    assert torch.all(zeros == n)


# ---------------------------------------------------------------------- versus SparseGPT


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("seed", [0, 1])
def test_not_worse_than_sparsegpt_random(mode, seed):
    W, X, H = correlated_layer(out=64, inp=256, n=512, seed=seed)
    kw = mode_kwargs(mode, W.shape[0])
    e_apt = recon_error(W, apt_prune(W, H, **kw), X)
    e_sgpt = recon_error(W, sparsegpt_prune(W, H, **kw), X)
    assert e_apt <= e_sgpt


@pytest.fixture(scope="module")
def smollm2_inputs(smollm2_dir, smollm2_tokenizer, shared_data):
    """Real inputs of layer 3's down_proj and q_proj on 4 windows × 128 tokens of wikitext-2 test."""
    from neuroal.models import load_full

    model, _ = load_full(smollm2_dir)
    text = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    ids = smollm2_tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids[: 4 * 128].reshape(4, 128)
    layer = model.model.layers[3]
    linears = {"down_proj": layer.mlp.down_proj, "q_proj": layer.self_attn.q_proj}
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        lin.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach()))
        for name, lin in linears.items()
    ]
    try:
        with torch.no_grad():
            model(windows)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for name, lin in linears.items():
        X = seen[name].reshape(-1, seen[name].shape[-1]).float()  # [512, in]
        result[name] = (lin.weight.detach().float().clone(), X, 2 * X.T @ X / X.shape[0])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["down_proj", "q_proj"])
def test_not_worse_than_sparsegpt_smollm2(smollm2_inputs, name, mode):
    W, X, H = smollm2_inputs[name]
    kw = mode_kwargs(mode, W.shape[0])
    e_apt = recon_error(W, apt_prune(W, H, **kw), X)
    e_sgpt = recon_error(W, sparsegpt_prune(W, H, **kw), X)
    assert e_apt <= e_sgpt


# ------------------------------------------------------------------------- numerics and input


def test_exactly_singular_hessian_raises():
    """A singular H with a nonzero diagonal (rank 2) and no damping."""
    v = torch.tensor([[1.0, 2.0, 1.0, 1.0, 2.0, 1.0], [1.0, 0.0, -1.0, 1.0, 0.0, -1.0]])
    H = v.T @ v  # [6, 6], diagonal 2, 4, 2, 2, 4, 2
    W = torch.randn(3, 6)
    with pytest.raises(SingularHessianError):
        apt_prune(W, H, 0.5, percdamp=0.0)
    assert torch.isfinite(apt_prune(W, H, 0.5, percdamp=0.01)).all()


@pytest.mark.parametrize("seed", range(12))
def test_rank_deficient_hessian_raises_not_nan(seed):
    """Fewer samples than inputs, no damping: fp32 may 'factor' it; the result must be an error, not garbage."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn([4, 16, 31][seed % 3], 32, generator=g)  # rank 4, 16 or 31 < 32
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(8, 32, generator=g)
    with pytest.raises(SingularHessianError):
        apt_prune(W, H, 0.5, percdamp=0.0)
    assert torch.isfinite(apt_prune(W, H, 0.5, percdamp=0.01)).all()


def test_dead_inputs_dtype_and_no_side_effects():
    W, X, H = correlated_layer(out=16, inp=64, n=128, seed=8)
    H[:, 5] = 0
    H[5, :] = 0  # input channel 5 never fires
    W16, H0 = W.to(torch.bfloat16), H.clone()
    out = apt_prune(W16, H, 0.5)
    assert out.dtype == torch.bfloat16 and out.shape == W.shape
    assert torch.equal(W16, W.to(torch.bfloat16)) and torch.equal(H, H0)
    assert torch.all(out[:, 5] == 0) and torch.isfinite(out.float()).all()
    same = apt_prune(W, H, 0.0)  # nothing pruned: only the dead column is zeroed
    assert torch.equal(same[:, torch.arange(64) != 5], W[:, torch.arange(64) != 5])


@pytest.mark.parametrize(
    "kw",
    [dict(prunen=2, prunem=3), dict(prunen=4, prunem=4), dict(prunen=2, prunem=0), dict(sparsity=1.5),
     dict(sparsity=torch.zeros(3))],
)
def test_bad_arguments(kw):
    W, X, H = correlated_layer(out=8, inp=16, n=32)
    kw = {"sparsity": 0.5, **kw}
    with pytest.raises(SpecError):
        apt_prune(W, H, kw.pop("sparsity"), **kw)
