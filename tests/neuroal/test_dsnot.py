"""DSnoT prune-and-grow masks: invariants, a hand case, and equality with loop implementations."""

from __future__ import annotations

import pytest
import torch

from neuroal.refiners.dsnot import dsnot_mask, dsnot_nm_mask, reorder_for_pruning

# ------------------------------------------------------------------------------------- helpers


def layer(out=32, inp=256, seed=0):
    """Random weights and calibration statistics at a scale where |e| ≫ the 0.1 threshold."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    a = torch.rand(inp, generator=g) + 0.5  # Wanda input norm
    mean_x = torch.randn(inp, generator=g) * 5  # Σ_tokens x / n_windows
    var_x = torch.rand(inp, generator=g) + 0.5
    wanda = W.abs() * a
    return W, W.abs(), wanda, mean_x, var_x


def row_error(W, mean_x, mask):
    return ((W * mean_x) * mask).sum(dim=1)  # [out] Σ_pruned W · E[x]


def initial_row_mask(metric, sparsity):
    k = int(metric.shape[1] * sparsity)
    idx = torch.sort(metric, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)


def loop_dsnot(W, initial, wanda, mean_x, var_x, sparsity, cycles=50, thr=0.1, pw=1.0, same_sign=False):
    """Straightforward per-row loop with Python lists for the orders and explicit pointers."""
    out, n = W.shape
    k = int(n * sparsity)
    D = W.float() * mean_x.float()[None, :]
    mask = initial_row_mask(initial, sparsity)
    for i in range(out):
        row = mask[i]
        pruned_D = D[i].masked_fill(~row, 0.0)
        e = pruned_D.sum()
        sign0 = torch.sign(e)
        regrow = torch.sort(pruned_D / var_x.float() ** pw, stable=True).indices.tolist()
        kept = sorted((j for j in range(n) if not row[j]), key=lambda j: (wanda[i, j].item(), j))
        negatives = [j for j in kept if D[i, j] < 0]
        positives = [j for j in kept if D[i, j] > 0]
        zeros = [kept[0]] * (len(kept) - len(negatives) - len(positives))
        prune = negatives + zeros + positives[::-1]
        lo_r, hi_r, lo_p, hi_p = 0, n - 1, 0, len(prune) - 1
        for _ in range(cycles):
            if e > 0:
                ir, hi_r = hi_r, hi_r - 1
            else:
                ir, lo_r = lo_r, lo_r + 1
            if e < 0:
                ip, hi_p = hi_p, hi_p - 1
            else:
                ip, lo_p = lo_p, lo_p + 1
            if not (0 <= ir < n and 0 <= ip < len(prune)) or abs(e) <= thr:
                break
            r, p = regrow[ir], prune[ip]
            if not row[r] or row[p]:
                break
            after = e + D[i, p] - D[i, r]
            if same_sign and torch.sign(after) != sign0:
                break
            row[p], row[r], e = True, False, after
    return mask


def reference_dsnot(W, initial, wanda, mean_x, var_x, sparsity, cycles=50, thr=0.1, pw=1.0, same_sign=False):
    """The reference's all-rows loop semantics: pointers always advance and every row is written
    every cycle (mask[p] = update, mask[r] = not update), update flags are cumulative."""
    out, n = W.shape
    k = int(n * sparsity)
    rows = torch.arange(out)
    D = W.float() * mean_x.float()[None, :]
    mask = initial_row_mask(initial, sparsity)
    pruned_D = D.masked_fill(~mask, 0.0)
    e = pruned_D.sum(dim=1)
    sign0 = torch.sign(e)
    regrow = torch.sort(pruned_D / var_x.float()[None, :] ** pw, dim=1, stable=True).indices
    kept = torch.sort(wanda.masked_fill(mask, float("inf")), dim=1, stable=True).indices[:, : n - k]
    prune = kept.gather(1, reorder_for_pruning(D.gather(1, kept)))
    ptr_r = torch.tensor([[0, n - 1]]).repeat(out, 1)
    ptr_p = torch.tensor([[0, n - k - 1]]).repeat(out, 1)
    step = torch.tensor([1, -1])
    update = torch.ones(out, dtype=torch.bool)
    cycle = 0
    while not (not update.any() or cycle >= cycles):
        cycle += 1
        sr, sp = (e > 0).long(), (e < 0).long()
        r, p = regrow[rows, ptr_r[rows, sr]], prune[rows, ptr_p[rows, sp]]
        ptr_r[rows, sr] += step[sr]
        ptr_p[rows, sp] += step[sp]
        after = e + D[rows, p] - D[rows, r]
        update = update & (e.abs() > thr)
        if same_sign:
            update = update & (sign0 == torch.sign(after))
        mask[rows, p] = update
        mask[rows, r] = ~update
        e = e + torch.where(update, D[rows, p], 0.0) - torch.where(update, D[rows, r], 0.0)
    return mask


def reference_dsnot_nm(W, initial, mean_x, var_x, n_, m_, cycles=50, thr=0.1, pw=1.0):
    """The reference's N:M loop semantics (always the same-sign rule; pruned/visited → +inf)."""
    out, n = W.shape
    rows = torch.arange(out)
    D = W.float() * mean_x.float()[None, :]
    mask = torch.zeros(out, n, dtype=torch.bool)
    for g0 in range(0, n, m_):
        low = torch.sort(initial[:, g0 : g0 + m_].float(), dim=1, stable=True).indices[:, :n_] + g0
        mask.scatter_(1, low, True)
    pruned_D = D.masked_fill(~mask, 0.0)
    e = pruned_D.sum(dim=1)
    sign0 = torch.sign(e)
    regrow = torch.sort(pruned_D / var_x.float()[None, :] ** pw, dim=1, stable=True).indices
    blocked = initial.float().masked_fill(mask, float("inf"))
    ptr = torch.tensor([[0, n - 1]]).repeat(out, 1)
    step = torch.tensor([1, -1])
    update = torch.ones(out, dtype=torch.bool)
    cycle = 1
    while not (not update.any() or cycle > cycles):
        cycle += 1
        s = (e > 0).long()
        r = regrow[rows, ptr[rows, s]]
        start = r - r % m_
        group = blocked.gather(1, start[:, None] + torch.arange(m_))
        p = start + torch.topk(group, 1, largest=False)[1][:, 0]
        after = e + D[rows, p] - D[rows, r]
        update = update & (sign0 == torch.sign(after)) & (e.abs() > thr)
        blocked[rows, p] = float("inf")
        mask[rows, p] = update
        mask[rows, r] = ~update
        e = e + torch.where(update, D[rows, p], 0.0) - torch.where(update, D[rows, r], 0.0)
        ptr[rows, s] += step[s]
    return mask


# ---------------------------------------------------------------------------------- unstructured


def test_reorder_for_pruning_matches_reference_examples():
    v = torch.tensor([[1.0, -2.0, 3.0], [-2.0, 2.0, -4.0], [5.0, 6.0, -7.0], [-6.0, -7.0, -4.0]])
    expected_values = torch.tensor(
        [[-2.0, 3.0, 1.0], [-2.0, -4.0, 2.0], [-7.0, 6.0, 5.0], [-6.0, -7.0, -4.0]]
    )
    assert torch.equal(v.gather(1, reorder_for_pruning(v)), expected_values)
    # Entries equal to 0 all map to index 0 (the reference's quirk).
    assert reorder_for_pruning(torch.tensor([[0.0, 5.0, -1.0, 0.0]])).tolist() == [[2, 0, 0, 1]]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("same_sign", [False, True])
def test_row_sparsity_is_exact_and_swaps_happen(sparsity, same_sign):
    W, initial, wanda, mean_x, var_x = layer()
    mask = dsnot_mask(W, initial, wanda, mean_x, var_x, sparsity, same_sign=same_sign)
    assert (mask.sum(dim=1) == int(256 * sparsity)).all()
    assert (mask != initial_row_mask(initial, sparsity)).any()


def test_zero_cycles_returns_initial_mask():
    W, initial, wanda, mean_x, var_x = layer()
    mask = dsnot_mask(W, initial, wanda, mean_x, var_x, 0.5, max_cycles=0)
    assert torch.equal(mask, initial_row_mask(initial, 0.5))


def test_hand_case_one_and_two_cycles():
    # mean_x = var_x = 1, so D = W; both metrics are |W|; 3 of 6 pruned per row.
    W = torch.tensor([[0.1, -0.2, 0.3, 1.0, -2.0, 3.0], [0.3, 0.29, 0.28, -0.31, 0.5, -0.6]])
    ones = torch.ones(6)

    def run(cycles, same_sign=False):
        m = dsnot_mask(W, W.abs(), W.abs(), ones, ones, 0.5, max_cycles=cycles, same_sign=same_sign)
        return [sorted(torch.nonzero(r).flatten().tolist()) for r in m]

    # Initial: row 0 prunes {0, 1, 2}, e = 0.2; row 1 prunes {0, 1, 2}, e = 0.87.
    assert run(0) == [[0, 1, 2], [0, 1, 2]]
    # Cycle 1, row 0: e > 0 → regrow the largest pruned D (idx 2, 0.3), prune the first kept
    # negative by Wanda (idx 4, −2.0): e → 0.2 − 2.0 − 0.3 = −2.1, an overshoot the reference
    # accepts (no same-sign rule). Row 1: regrow idx 0 (0.3), prune idx 3 (−0.31): e → 0.26.
    assert run(1) == [[0, 1, 4], [1, 2, 3]]
    # With the same-sign rule, row 0's swap flips the sign, so the row stops unchanged.
    assert run(1, same_sign=True) == [[0, 1, 2], [1, 2, 3]]
    # Cycle 2. Row 0 (e = −2.1 < 0): regrow from the left of the regrow order, which was sorted
    # once on the initial mask (idx 1, −0.2; idx 4 just pruned is not in it), and prune the
    # positive kept weight with the lowest Wanda score (idx 3, 1.0): e → −2.1 + 1.0 + 0.2 = −0.9.
    # Row 1 (e = 0.26): regrow idx 1 (0.29), prune idx 5 (−0.6): e → −0.63.
    assert run(2) == [[0, 3, 4], [2, 3, 5]]
    assert run(2, same_sign=True) == [[0, 1, 2], [1, 2, 3]]


def test_error_never_grows_with_same_sign_rule():
    # With the same-sign rule each applied swap adds a D ≤ 0 and removes a D ≥ 0 when e > 0 (and
    # the mirror when e < 0) without crossing 0, so |e| is non-increasing row by row as long as
    # the pointers stay in their sign regions (≥ 50 weights of each sign per row here).
    W, initial, wanda, mean_x, var_x = layer(out=64, inp=512, seed=1)
    e0 = row_error(W, mean_x, initial_row_mask(initial, 0.5))
    mask = dsnot_mask(W, initial, wanda, mean_x, var_x, 0.5, same_sign=True)
    e1 = row_error(W, mean_x, mask)
    assert (e1.abs() <= e0.abs() + 1e-6).all()
    assert (torch.sign(e1) == torch.sign(e0)).all()
    assert (e1.abs() < e0.abs() - 1e-6).float().mean() > 0.5  # most rows improve


def test_error_guarantee_without_same_sign_rule():
    # The reference's default gives no per-row monotonicity (see the hand case: one swap can
    # overshoot). What it guarantees: a row either ends with |e| ≤ threshold or swapped in every
    # cycle, and rows starting at |e| ≤ threshold are untouched.
    W, initial, wanda, mean_x, var_x = layer(out=64, inp=512, seed=2)
    mean_x = mean_x * 0.2  # bring |e| near the threshold so both kinds of rows occur
    start = initial_row_mask(initial, 0.5)
    e0 = row_error(W, mean_x, start)
    for cycles in (5, 50):
        mask = dsnot_mask(W, initial, wanda, mean_x, var_x, 0.5, max_cycles=cycles)
        e1 = row_error(W, mean_x, mask)
        swaps = (mask != start).sum(dim=1) // 2
        assert ((e1.abs() <= 0.1 + 1e-6) | (swaps == cycles)).all()
        assert (swaps[e0.abs() <= 0.1] == 0).all()
    assert (e0.abs() <= 0.1).any() and (e0.abs() > 0.1).any()
    # Measured on this data (not a guarantee): the mean |e| over rows drops.
    assert e1.abs().mean() < e0.abs().mean()


@pytest.mark.parametrize("same_sign", [False, True])
@pytest.mark.parametrize("pw", [1.0, 0.0, 2.0])
def test_vectorised_equals_per_row_loop(same_sign, pw):
    for seed, (out, inp, s) in enumerate([(16, 256, 0.5), (24, 100, 0.7), (8, 64, 0.3)]):
        W, initial, wanda, mean_x, var_x = layer(out, inp, seed=seed + 10)
        fast = dsnot_mask(W, initial, wanda, mean_x, var_x, s, pow_of_var_regrowing=pw, same_sign=same_sign)
        slow = loop_dsnot(W, initial, wanda, mean_x, var_x, s, pw=pw, same_sign=same_sign)
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("same_sign", [False, True])
def test_equals_reference_loop_semantics_on_wide_rows(same_sign):
    W, initial, wanda, mean_x, var_x = layer(out=48, inp=512, seed=5)
    for s in (0.5, 0.6):
        ours = dsnot_mask(W, initial, wanda, mean_x, var_x, s, same_sign=same_sign)
        ref = reference_dsnot(W, initial, wanda, mean_x, var_x, s, same_sign=same_sign)
        assert torch.equal(ours, ref)


def test_narrow_rows_keep_exact_sparsity_where_the_reference_would_not():
    # 12 inputs, 200 cycles: pointers exhaust their regions. The reference then prunes or
    # regrows already-visited weights (or indexes out of range); here the row stops instead.
    W, initial, wanda, mean_x, var_x = layer(out=64, inp=12, seed=7)
    mask = dsnot_mask(W, initial, wanda, mean_x, var_x, 0.5, max_cycles=200, update_threshold=0.0)
    assert (mask.sum(dim=1) == 6).all()
    assert torch.equal(
        mask, loop_dsnot(W, initial, wanda, mean_x, var_x, 0.5, cycles=200, thr=0.0)
    )


def test_zero_metric_entries_and_edge_sparsities():
    W, initial, wanda, mean_x, var_x = layer(out=16, inp=64, seed=8)
    mean_x[::7] = 0.0  # D = 0 on some channels: the index-0 quirk in the prune order
    mask = dsnot_mask(W, initial, wanda, mean_x, var_x, 0.5)
    assert (mask.sum(dim=1) == 32).all()
    assert torch.equal(mask, loop_dsnot(W, initial, wanda, mean_x, var_x, 0.5))
    assert not dsnot_mask(W, initial, wanda, mean_x, var_x, 0.0).any()
    assert dsnot_mask(W, initial, wanda, mean_x, var_x, 1.0).all()


def test_input_validation():
    W, initial, wanda, mean_x, var_x = layer(out=4, inp=8)
    with pytest.raises(ValueError, match="mean_x"):
        dsnot_mask(W, initial, wanda, mean_x[:4], var_x, 0.5)
    with pytest.raises(ValueError, match="wanda_metric"):
        dsnot_mask(W, initial, wanda.T, mean_x, var_x, 0.5)
    with pytest.raises(ValueError, match="N:M"):
        dsnot_nm_mask(torch.randn(4, 6), torch.rand(4, 6), torch.rand(6), torch.rand(6), 2, 4)


# -------------------------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n_, m_", [(2, 4), (4, 8)])
def test_nm_pattern_preserved_and_swaps_happen(n_, m_):
    W, initial, _, mean_x, var_x = layer(out=32, inp=256, seed=3)
    mask = dsnot_nm_mask(W, initial, mean_x, var_x, n_, m_)
    assert (mask.reshape(32, -1, m_).sum(dim=2) == n_).all()
    start = dsnot_nm_mask(W, initial, mean_x, var_x, n_, m_, max_cycles=0)
    assert (start.reshape(32, -1, m_).sum(dim=2) == n_).all()
    assert (mask != start).any()
    # The N:M path always applies the same-sign rule, so |e| never grows.
    e0, e1 = row_error(W, mean_x, start), row_error(W, mean_x, mask)
    assert (e1.abs() <= e0.abs() + 1e-6).all() and (torch.sign(e1) == torch.sign(e0)).all()


def test_nm_zero_cycles_is_plain_nm_mask():
    W, initial, _, mean_x, var_x = layer(out=8, inp=16, seed=4)
    mask = dsnot_nm_mask(W, initial, mean_x, var_x, 2, 4, max_cycles=0)
    low = torch.sort(initial.reshape(8, 4, 4), dim=2).indices[..., :2]
    expected = torch.zeros(8, 4, 4, dtype=torch.bool).scatter_(2, low, True).reshape(8, 16)
    assert torch.equal(mask, expected)


def test_nm_hand_case():
    # One row, 2:4 on 8 inputs, D = W. Groups [0..3], [4..7]; the 2 lowest |W| per group pruned:
    # {0, 1} and {4, 5}; e = 0.3 + 0.2 + 0.25 − 0.05 = 0.7 > 0.
    W = torch.tensor([[0.3, 0.2, 0.9, -0.45, 0.25, -0.05, 1.0, 0.5]])
    ones = torch.ones(8)
    mask = dsnot_nm_mask(W, W.abs(), ones, ones, 2, 4, max_cycles=1)
    # Regrow the largest pruned D (idx 0, 0.3); in its group prune the kept weight with the lowest
    # initial metric (idx 3, |−0.45|): e → 0.7 − 0.45 − 0.3 = −0.05, sign flips → no swap.
    assert sorted(torch.nonzero(mask[0]).flatten().tolist()) == [0, 1, 4, 5]
    W2 = W.clone()
    W2[0, 3] = -0.35
    mask = dsnot_nm_mask(W2, W2.abs(), ones, ones, 2, 4, max_cycles=1)
    # Now e → 0.7 − 0.35 − 0.3 = 0.05 > 0: swap idx 0 (regrown) ↔ idx 3 (pruned).
    assert sorted(torch.nonzero(mask[0]).flatten().tolist()) == [1, 3, 4, 5]


@pytest.mark.parametrize("n_, m_", [(2, 4), (4, 8)])
def test_nm_equals_reference_loop_semantics(n_, m_):
    W, initial, _, mean_x, var_x = layer(out=48, inp=512, seed=6)
    ours = dsnot_nm_mask(W, initial, mean_x, var_x, n_, m_)
    ref = reference_dsnot_nm(W, initial, mean_x, var_x, n_, m_)
    assert torch.equal(ours, ref)
