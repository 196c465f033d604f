"""Scores and masks on hand-checkable tensors."""

import pytest
import torch

from neuroal import masks
from neuroal.methods import METHODS, Pattern, parse_pattern, prune_linear
from neuroal.scores import SCORES, magnitude, multiflow, wanda
from neuroal.stats import NORMS, LinearStats
from neuroal.errors import SpecError


def stats_with_norms(a):
    st = LinearStats(kinds=frozenset({NORMS}))
    st.scaler_row = torch.tensor(a, dtype=torch.float32) ** 2  # a = sqrt(scaler_row)
    st.n_windows = 1
    return st


W = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 1.0]])
A = [2.0, 1.0, 0.5]


def test_magnitude_is_abs():
    assert torch.equal(magnitude(W), W.abs())


def test_wanda_broadcasts_input_norm_over_rows():
    assert torch.allclose(wanda(W, stats_with_norms(A)), torch.tensor([[2.0, 2.0, 1.5], [8.0, 0.5, 0.5]]))


def test_multiflow_by_hand():
    S = torch.tensor([[2.0, 2.0, 1.5], [8.0, 0.5, 0.5]])  # |W|·a
    imp_out = torch.tensor([5.5 / 3, 9.0 / 3])
    imp_in = torch.tensor([5.0, 1.25, 1.0])
    expect = W.abs() * torch.outer(imp_out, imp_in)
    assert torch.allclose(multiflow(W, stats_with_norms(A)), expect)


def test_stats_replay_the_reference_running_means():
    """WrappedGPT/SparseGPT add_batch, one window per call, equals our batched hook bit for bit."""
    import math

    torch.manual_seed(0)
    x = torch.randn(5, 7, 6)
    kinds = frozenset({"norms", "moments", "hessian", "hessian_norms"})
    st = LinearStats(kinds=kinds)
    st.add(x[:2])
    st.add(x[2:])
    scaler, summ, H, sh, n = torch.zeros(6), torch.zeros(6), torch.zeros(6, 6), torch.zeros(6), 0
    for w in range(5):
        inp = x[w].t()
        scaler *= n / (n + 1)
        summ *= n / (n + 1)
        H *= n / (n + 1)
        sh *= n / (n + 1)
        n += 1
        scaler += torch.norm(inp, p=2, dim=1) ** 2 / n
        summ += torch.sum(inp, dim=1) / n
        scaled = math.sqrt(2 / n) * inp
        H += scaled.matmul(scaled.t())
        sh += torch.norm(scaled, p=2, dim=1) ** 2 / n
    assert torch.equal(st.scaler_row, scaler) and torch.equal(st.mean_x, summ)
    assert torch.equal(st.hessian, H) and torch.equal(st.scaler_row_h, sh)
    # the SparseGPT wrapper's norms weigh window k by 2/(k N): the reference's quirk
    w = torch.tensor([2 / (k * 5) for k in range(1, 6)])
    assert torch.allclose(sh, (w.reshape(-1, 1) * x.square().sum(1)).sum(0), rtol=1e-5)


def test_stats_normalise_by_windows_like_the_reference():
    st = LinearStats(kinds=frozenset({NORMS}))
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]])  # 2 windows x 2 tokens
    st.add(x[:1])
    st.add(x[1:])
    assert torch.allclose(st.scaler_row, torch.tensor([(1 + 9 + 0 + 1) / 2, (4 + 16 + 1 + 0) / 2]))


def test_row_mask_prunes_floor_count_per_row_stably():
    score = torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.0, 5.0, 5.0, 4.0]])
    m = masks.row_mask(score, 0.5)
    assert m.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert masks.row_mask(score, 0.7).sum(1).tolist() == [2, 2]  # int(4*0.7) = 2


def test_row_mask_ratios_keeps_top_floor_density():
    score = torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.0, 5.0, 6.0, 4.0]])
    m = masks.row_mask_ratios(score, torch.tensor([0.25, 0.7], dtype=torch.float64))
    # row 0 keeps floor(0.75*4)=3: drops the 1.0; row 1 keeps floor(0.3*4)=1: keeps the 6.0
    assert m.tolist() == [[False, True, False, False], [True, True, False, True]]


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_row_ratios_equal_a_per_row_loop(ties):
    torch.manual_seed(0)
    score = torch.randint(0, 5, (50, 64)).float() if ties else torch.rand(50, 64)
    ratios = torch.rand(50, dtype=torch.float64) * 0.9
    ratios[0], ratios[1] = 0.0, 1.0  # keep all, keep none
    m = masks.row_mask_ratios(score, ratios)
    for i in range(50):
        keep = int((1 - ratios[i].item()) * 64)
        top = torch.sort(score[i], descending=True, stable=True)[1][:keep]
        expect = torch.ones(64, dtype=torch.bool)
        expect[top] = False
        assert torch.equal(m[i], expect)


def test_kth_smallest_by_hand():
    score = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0], [9.0, float("nan"), 8.0], [4.0, 4.0, 4.0]])
    assert masks.kth_smallest(score, 2).tolist() == [[2.0], [5.0], [9.0], [4.0]]  # NaN sorts last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kth_smallest_is_torch_kthvalue(dtype):
    """numpy's introselect gives torch.kthvalue's values in every score dtype (bfloat16 through an exact
    float32), with ties, infinities (row_mask_ratios' padding) and NaN; and so the same masks."""
    torch.manual_seed(1)
    for score in (torch.rand(301, 256), torch.randint(0, 7, (301, 256)).float()):
        score = score.to(dtype)
        score[3, :5] = float("inf")
        score[4, :5] = float("-inf")
        score[5, 7] = float("nan")
        for k in (1, 77, 179, 256):
            got = masks.kth_smallest(score, k)
            assert got.dtype == dtype and got.shape == (301, 1)
            ref = torch.kthvalue(score, k, dim=1, keepdim=True).values
            torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
        expect = torch.zeros_like(score, dtype=torch.bool)
        expect.scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :179], True)  # int(256 * 0.7) = 179
        assert torch.equal(masks.row_mask(score, 0.7), expect)


def test_layer_mask_exact_count():
    torch.manual_seed(0)
    score = torch.rand(8, 16)
    m = masks.layer_mask(score, 0.3)
    assert m.sum().item() == int(128 * 0.3)
    assert score[m].max() <= score[~m].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_exact_pattern(n, m):
    torch.manual_seed(1)
    score = torch.rand(6, 32)
    mask = masks.nm_mask(score, n, m)
    groups = mask.reshape(6, -1, m)
    assert (groups.sum(-1) == n).all()
    s = score.reshape(6, -1, m)
    assert (s[groups].reshape(6, -1, n).max(-1).values <= s[~groups].reshape(6, -1, m - n).min(-1).values).all()


def test_nm_mask_hand_case():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.4]])
    assert masks.nm_mask(score, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == Pattern(2, 4)
    for bad in ("4:4", "5:4", "x", "0:4"):
        with pytest.raises(SpecError, match="--pattern"):
            parse_pattern(bad)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_prunes_a_layer_to_the_requested_sparsity(name):
    torch.manual_seed(0)
    Wl = torch.randn(16, 64)
    X = torch.randn(4, 32, 64)
    st = LinearStats(kinds=METHODS.get(name).needs | {NORMS})
    st.add(X)
    st.add_output(X @ Wl.T)  # D²Prune's output norms
    new = prune_linear(Wl, st, 0.5, METHODS.get(name))
    assert (new == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    nm = prune_linear(Wl, st, 0.5, METHODS.get(name), pattern=Pattern(2, 4))
    assert ((nm == 0).reshape(16, -1, 4).sum(-1) == 2).all()


def test_registries_name_every_method():
    assert METHODS.names() == ["magnitude", "wanda", "sparsegpt", "multiflow", "apt", "ria", "d2prune"]
    assert SCORES.names() == ["magnitude", "wanda", "multiflow", "ria"]  # the score-based methods, registered once
    assert all(SCORES.get(n) is METHODS.get(n).score for n in SCORES.names())
    assert "sparsegpt" not in SCORES and "wanda" in SCORES
    with pytest.raises(SpecError, match="score: got 'sparsegpt'"):
        SCORES.get("sparsegpt")
    with pytest.raises(SpecError, match="--method.*did you mean 'wanda'"):
        METHODS.get("wand")
