"""The block unit: sparsity, batching invariance, weight restoration, the alignment metric."""

import pytest
import torch

from neuroal import block as B
from neuroal import stats as S
from neuroal.allocation.owl import OWL
from neuroal.block_forward import capture_block_inputs
from neuroal.families import get_blocks
from neuroal.methods import METHODS, Pattern, prune_linear
from neuroal.models import load_full
from neuroal.prunable import block_linears


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    model, family = load_full(tiny_dirs["llama"])
    ids = torch.randint(0, 2000, (6, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, family, ids)
    return model, family, inputs


def _fresh_block(llama):
    import copy

    model, family, inputs = llama
    return copy.deepcopy(get_blocks(model, family)[1]), family, inputs


@pytest.mark.parametrize("method", ["magnitude", "wanda", "multiflow", "sparsegpt"])
def test_prune_block_hits_the_ratio_per_linear(llama, method):
    block, family, inputs = _fresh_block(llama)
    ratios = {n: 0.5 for n in family.linears}
    out, rec = B.prune_block(block, family, inputs.hidden, inputs.kwargs, ratios, B.PruneOptions(method=method))
    assert out.shape == inputs.hidden.shape and torch.isfinite(out).all()
    for name, frac in rec.sparsity.items():
        assert frac == pytest.approx(0.5, abs=0.02), name


def test_micro_batches_equal_one_batch(llama):
    block_a, family, inputs = _fresh_block(llama)
    block_b, _, _ = _fresh_block(llama)
    ratios = {n: 0.6 for n in family.linears}
    out_a, _ = B.prune_block(block_a, family, inputs.hidden, inputs.kwargs, ratios, B.PruneOptions(max_tokens=10**6))
    out_b, _ = B.prune_block(block_b, family, inputs.hidden, inputs.kwargs, ratios, B.PruneOptions(max_tokens=24))
    for name in family.linears:
        assert torch.equal(block_linears(block_a, family)[name].weight, block_linears(block_b, family)[name].weight)
    assert torch.allclose(out_a, out_b, atol=1e-5)


def test_hook_sums_equal_a_per_window_loop(llama):
    block, family, inputs = _fresh_block(llama)
    linears = block_linears(block, family)
    kinds = frozenset({S.NORMS, S.MOMENTS, S.HESSIAN})
    batched, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, kinds, 10**6, want_output=True)
    looped = {n: S.LinearStats(kinds=kinds) for n in linears}
    with S.collect(linears, kinds) as st:
        for i in range(inputs.hidden.shape[0]):
            B.call_block(block, inputs.hidden[i : i + 1], inputs.kwargs)
    looped = st
    for n in linears:
        assert torch.allclose(batched[n].norms, looped[n].norms, rtol=1e-5)
        assert torch.allclose(batched[n].var_x, looped[n].var_x, rtol=1e-4, atol=1e-6)
        assert torch.allclose(batched[n].hessian, looped[n].hessian, rtol=1e-4, atol=1e-5)


def test_linears_sharing_an_input_get_identical_statistics(llama):
    """q/k/v (and gate/up) copy one computation; the result equals each computing its own."""
    block, family, inputs = _fresh_block(llama)
    linears = block_linears(block, family)
    kinds = frozenset({S.NORMS, S.MOMENTS, S.HESSIAN, S.HESSIAN_NORMS})
    seen = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].clone())) for n, m in linears.items()]
    shared, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, kinds, 2 * 24, want_output=True)
    for h in handles:
        h.remove()
    for n in linears:
        own = S.LinearStats(kinds=kinds)
        for x in seen[n]:
            own.add(x)
        for f in ("scaler_row", "sum_metric_row", "mean", "var", "H", "scaler_row_h"):
            assert torch.equal(getattr(shared[n], f), getattr(own, f)), (n, f)


def test_a_linear_stops_copying_once_its_input_differs():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    xs = [torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    kinds = frozenset({S.NORMS, S.HESSIAN})
    with S.collect({"a": a, "b": b}, kinds) as st:
        a(xs[0]), b(xs[0])  # shared: b copies a
        a(xs[1]), b(xs[2])  # b's own input
        a(xs[3]), b(xs[3])  # shared again, but b's history differs: it must compute
    for name, seq in (("a", [xs[0], xs[1], xs[3]]), ("b", [xs[0], xs[2], xs[3]])):
        own = S.LinearStats(kinds=kinds)
        for x in seq:
            own.add(x)
        assert torch.equal(st[name].scaler_row, own.scaler_row) and torch.equal(st[name].H, own.H), name


def test_score_block_leaves_the_block_unchanged(llama):
    block, family, inputs = _fresh_block(llama)
    before = {n: l.weight.clone() for n, l in block_linears(block, family).items()}
    ratios = {n: 0.7 for n in family.linears}
    out, rec = B.score_block(block, family, inputs.hidden, inputs.kwargs, ratios, B.PruneOptions(), want_alignment=True)
    for n, l in block_linears(block, family).items():
        assert torch.equal(l.weight, before[n])
    assert set(rec.metric) == set(family.linears) and all(v >= 0 for v in rec.metric.values())
    # q, k, v see the same input in the dense and sparse pass: zero change
    assert rec.metric["self_attn.q_proj"] == 0 and rec.alignment["self_attn.q_proj"].abs().max() == 0
    assert rec.metric["mlp.down_proj"] > 0
    # the sparse output equals a real prune of a copy
    block2, _, _ = _fresh_block(llama)
    out2, _ = B.prune_block(block2, family, inputs.hidden, inputs.kwargs, ratios, B.PruneOptions())
    assert torch.allclose(out, out2, atol=1e-6)


def test_alignment_metric_by_hand():
    a_d = torch.tensor([1.0, 1.0, 2.0])  # normalised [.25, .25, .5]
    a_s = torch.tensor([1.0, 2.0, 1.0])  # normalised [.25, .5, .25]
    assert B.alignment_metric(a_d, a_s) == pytest.approx((0.0625 + 0.0625) ** 0.5 / 3)
    assert B.alignment_metric(a_d, 3 * a_d) == pytest.approx(0.0, abs=1e-9)


def test_owl_outlier_ratio_by_hand(llama):
    block, family, inputs = _fresh_block(llama)
    owl = OWL(m=5.0)
    out, rec = B.dense_block(block, family, inputs.hidden, inputs.kwargs, kinds=owl.stats_kinds,
                             summary=owl.block_summary)
    linears = block_linears(block, family)
    with S.collect(linears, frozenset({S.NORMS})) as st:
        B.forward_block(block, inputs.hidden, inputs.kwargs)
    scores = torch.cat([(l.weight.abs() * st[n].norms).flatten() for n, l in linears.items()])
    assert rec.summary == pytest.approx(100 * (scores > 5 * scores.mean()).float().mean().item())


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    mix = torch.randn(128, 128) * 0.3 + torch.eye(128)
    X = torch.randn(16, 64, 128) @ mix  # correlated inputs
    st = S.LinearStats(kinds=frozenset({S.NORMS, S.HESSIAN}))
    st.add(X)
    flat = X.reshape(-1, 128)

    def err(method, **kw):
        Wp = prune_linear(W, st, 0.5, METHODS.get(method), **kw)
        return ((flat @ W.T - flat @ Wp.T) ** 2).sum().item()

    for kw in ({}, {"pattern": Pattern(2, 4)}):
        e_sgpt, e_wanda, e_mag = err("sparsegpt", **kw), err("wanda", **kw), err("magnitude", **kw)
        assert e_sgpt < e_wanda and e_sgpt < e_mag, (kw, e_sgpt, e_wanda, e_mag)
