"""RIA (relative importance and activations) on a 3×4 layer computed by hand, and against the reference formula."""

import pytest
import torch

from neuroal import masks
from neuroal.methods import METHODS, Pattern, prune_linear
from neuroal.refiners.dsnot import initial_metric
from neuroal.scores import SCORES, ria
from neuroal.stats import NORMS, LinearStats

W = torch.tensor([[1.0, -2.0, 0.0, 4.0],
                  [2.0, 1.0, -3.0, 0.0],
                  [0.0, 2.0, 1.0, -1.0]])  # row sums of |W| 7, 6, 4; column sums 3, 5, 4, 5


def one_token_stats(x):
    """Statistics of one window holding one token x: Wanda's input norm a = |x|."""
    st = LinearStats(kinds=frozenset({NORMS}))
    st.add(torch.tensor([[x]]))
    return st


STATS = one_token_stats([4.0, 1.0, 0.25, 9.0])  # a = (4, 1, 1/4, 9), a^0.5 = (2, 1, 1/2, 3)

# (|W|/colsum + |W|/rowsum) · a^0.5, entry by entry
BY_HAND = torch.tensor([
    [(1 / 3 + 1 / 7) * 2, (2 / 5 + 2 / 7) * 1, 0.0, (4 / 5 + 4 / 7) * 3],  # 0.952 0.686 0     4.114
    [(2 / 3 + 2 / 6) * 2, (1 / 5 + 1 / 6) * 1, (3 / 4 + 3 / 6) / 2, 0.0],  # 2     0.367 0.625 0
    [0.0, (2 / 5 + 2 / 4) * 1, (1 / 4 + 1 / 4) / 2, (1 / 5 + 1 / 4) * 3],  # 0     0.9   0.25  1.35
])


def test_ria_score_by_hand():
    assert torch.allclose(STATS.norms, torch.tensor([4.0, 1.0, 0.25, 9.0]))
    assert torch.allclose(ria(W, STATS), BY_HAND)


def test_ria_masks_by_hand():
    method = METHODS.get("ria")
    # per output row (default): each row's two lowest
    row = prune_linear(W, STATS, 0.5, method)
    assert (row == 0).tolist() == [[False, True, True, False],
                                   [False, True, False, True],
                                   [True, False, True, False]]
    # one threshold per layer (the reference's default): the six lowest of the matrix, row 1 loses three
    layer = prune_linear(W, STATS, 0.5, method, granularity="layer")
    assert (layer == 0).tolist() == [[False, False, True, False],
                                     [False, True, True, True],
                                     [True, False, True, False]]
    # 2:4 over the single group of each row: the row rule
    assert torch.equal(prune_linear(W, STATS, 0.5, method, pattern=Pattern(2, 4)), row)
    # per-row ratios (NeuroAL's row step): rows keep 3, 2 and 1 weights
    rows = prune_linear(W, STATS, torch.tensor([0.25, 0.5, 0.75]), method)
    assert (rows == 0).tolist() == [[False, False, True, False],
                                     [False, True, False, True],
                                     [True, True, True, False]]
    assert torch.equal(row[row != 0], W[row != 0])  # kept weights unchanged


def test_ria_matches_the_reference_formula():
    """`prune_ria`'s line, transcribed: (|W|/Σ_dim0 + |W|/Σ_dim1) · sqrt(scaler_row)^a."""
    torch.manual_seed(0)
    Wr = torch.randn(12, 16)
    st = LinearStats(kinds=frozenset({NORMS}))
    st.add(torch.randn(3, 10, 16))
    ref = (torch.abs(Wr) / torch.sum(torch.abs(Wr), dim=0) + torch.abs(Wr) / torch.sum(torch.abs(Wr), dim=1).reshape(-1, 1)) \
        * (torch.sqrt(st.scaler_row.reshape((1, -1)))) ** 0.5
    assert torch.allclose(ria(Wr, st), ref, rtol=1e-6, atol=0)
    assert torch.allclose(ria(Wr, st, a=1.0), ref / torch.sqrt(st.scaler_row) ** 0.5 * torch.sqrt(st.scaler_row))


def test_zero_rows_and_columns_score_zero_not_nan():
    Wz = W.clone()
    Wz[:, 0] = 0
    Wz[2] = 0
    s = ria(Wz, STATS)
    assert torch.isfinite(s).all() and (s[:, 0] == 0).all() and (s[2] == 0).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_ria_nm_masks_are_valid(n, m):
    torch.manual_seed(1)
    Wr = torch.randn(8, 32)
    st = LinearStats(kinds=frozenset({NORMS}))
    st.add(torch.randn(2, 6, 32))
    new = prune_linear(Wr, st, n / m, METHODS.get("ria"), pattern=Pattern(n, m))
    assert ((new == 0).reshape(8, -1, m).sum(-1) == n).all()
    assert torch.equal(new == 0, masks.nm_mask(ria(Wr, st), n, m))


def test_ria_is_registered_once_as_a_score_method():
    assert METHODS.get("ria").score is ria and SCORES.get("ria") is ria
    assert METHODS.get("ria").needs == frozenset({NORMS})
    assert torch.equal(initial_metric(W, STATS, METHODS.get("ria")), ria(W, STATS))  # DSnoT starts from RIA's mask
