"""Mixture of experts (Mixtral, Qwen3-MoE): fused experts pruned expert by expert.

Per-expert statistics come from each expert's routed tokens (hand-checked on a two-window case and
against a loop over the routed tokens of a real tiny block); an expert no calibration token reaches
is calibrated on all tokens (recorded), never NaN; NeuroAL's candidate pass swaps fused parameters
and puts them back; checkpoints written per expert load fused.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from neuroal import block as B
from neuroal import stats as S
from neuroal.allocation.neuroal import steps
from neuroal.block_forward import capture_block_inputs
from neuroal.errors import SpecError, UnsupportedArchitecture
from neuroal.families import Experts, family_for, get_blocks
from neuroal.methods import METHODS
from neuroal.models import load_full
from neuroal.prunable import ExpertMatrix, block_linears

MOE = ["mixtral", "qwen3_moe"]
KINDS = frozenset({S.NORMS, S.MOMENTS, S.HESSIAN})


@pytest.fixture(scope="module", params=MOE)
def moe(request, tiny_dirs):
    model, family = load_full(tiny_dirs[request.param])
    ids = torch.randint(0, 2000, (6, 16), generator=torch.Generator().manual_seed(0))
    return model, family, capture_block_inputs(model, family, ids)


def _block(moe, b=1):
    model, family, inputs = moe
    return copy.deepcopy(get_blocks(model, family)[b]), family, inputs


def _route_around(block, starved: int):
    """Make the router never pick expert `starved`: token t goes to experts t mod 3 and t+1 mod 3 of the others."""
    others = [e for e in range(4) if e != starved]

    def hook(_m, _args, out):
        logits, _, index = out
        t = torch.arange(index.shape[0])
        index = torch.stack([torch.tensor(others)[t % 3], torch.tensor(others)[(t + 1) % 3]], dim=1)
        return logits, torch.full(index.shape, 0.5, dtype=logits.dtype), index

    return block.mlp.gate.register_forward_hook(hook)


# ------------------------------------------------------------------ units


def test_every_expert_matrix_is_a_unit_and_the_router_is_not(moe):
    block, family, _ = _block(moe)
    units = block_linears(block, family)
    assert list(units) == list(family.linears)
    assert [n for n in units if "experts" in n] == [f"mlp.experts.{p}[{e}]" for e in range(4)
                                                     for p in ("gate_up_proj", "down_proj")]
    assert not any("gate." in n or n.endswith("gate") for n in units)  # the router mlp.gate is never pruned
    unit = units["mlp.experts.down_proj[2]"]
    assert isinstance(unit, ExpertMatrix) and (unit.out_features, unit.in_features) == (32, 40)
    assert torch.equal(unit.weight, block.mlp.experts.down_proj[2])
    unit.weight.data.copy_(torch.zeros(32, 40))  # writes go into the fused parameter
    assert (block.mlp.experts.down_proj[2] == 0).all() and (block.mlp.experts.down_proj[1] != 0).any()
    assert set(family.mlp) >= {n for n in units if "experts" in n}  # DSnoT's skip-MLP covers the experts


def test_qwen3_moe_with_dense_layers_is_refused():
    """mlp_only_layers makes some blocks dense: blocks would not share their units."""
    cfg = AutoConfig.for_model("qwen3_moe", num_experts=4, mlp_only_layers=[1])
    with pytest.raises(UnsupportedArchitecture, match="mlp_only_layers"):
        family_for(cfg)


def test_neuroal_runs_the_block_step_only_on_moe():
    family = family_for(AutoConfig.for_model("mixtral", num_local_experts=4))
    st = steps("both", METHODS.get("wanda"), family)
    assert (st.block, st.row) == (True, False) and "block step only" in st.notes[0] and "experts" in st.notes[0]


# ------------------------------------------------------------------ statistics


class _Moe(nn.Module):
    """A sparse-MoE block with a fixed routing: what the hooks see in Mixtral/Qwen3-MoE."""

    def __init__(self, experts, index):
        super().__init__()
        self.experts, self.index = experts, index

    def forward(self, hidden):  # [b, s, d]
        b, s, d = hidden.shape
        flat = hidden.reshape(-1, d)
        weights = torch.ones(self.index.shape, dtype=hidden.dtype)
        return self.experts(flat, self.index, weights).reshape(b, s, d)


def test_per_expert_wanda_statistics_by_hand():
    """2 windows of 2 tokens, top-1 routing to experts [0, 1 | 0, 0], expert 2 gets nothing.

    Each window counts once for every expert: scaler_row = Σ_routed x² / 2 windows.
    gate_up rows are gate = [1, 0], up = [0, 1] and act = relu, so down's input is relu(x0)·x1.
    """
    cfg = AutoConfig.for_model("mixtral", hidden_size=2, intermediate_size=1, num_local_experts=3, hidden_act="relu")
    experts = MixtralExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(3, 2, 2))
        experts.down_proj.fill_(1.0)
    moe = _Moe(experts, torch.tensor([[0], [1], [0], [0]]))
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[0.0, 1.0], [2.0, 2.0]]])  # [2 windows, 2 tokens, 2]
    spec = Experts()
    units = {f"{p}[{e}]": ExpertMatrix(experts, spec, p, e, moe) for e in range(3) for p in ("gate_up_proj", "down_proj")}
    with torch.no_grad(), S.collect(units, frozenset({S.NORMS, S.MOMENTS})) as st:
        moe(x)
    assert st["gate_up_proj[0]"].scaler_row.tolist() == [(1 + 0 + 4) / 2, (4 + 1 + 4) / 2]
    assert st["gate_up_proj[1]"].scaler_row.tolist() == [9 / 2, 0.0]
    assert st["down_proj[0]"].scaler_row.tolist() == [(2**2 + 0**2 + 4**2) / 2]  # relu(x0)·x1 = 2 | 0, 4
    assert [st[f"gate_up_proj[{e}]"].n_tokens for e in range(3)] == [3, 1, 0]
    assert all(st[f"gate_up_proj[{e}]"].n_windows == 2 for e in range(3))
    assert st["gate_up_proj[2]"].scaler_row.tolist() == [0.0, 0.0]  # no token: zeros, not NaN
    assert st["gate_up_proj[0]"].mean_x.tolist() == [(1 + 0 + 2) / 2, (2 + 1 + 2) / 2]


def test_per_expert_statistics_equal_a_loop_over_the_routed_tokens(moe):
    """On a real tiny block: the hook's sums equal a per-window loop over each expert's routed tokens."""
    block, family, inputs = _block(moe)
    seen = []
    h = block.mlp.experts.register_forward_pre_hook(lambda _m, a: seen.append((a[0].clone(), a[1].clone())))
    st, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, KINDS, 2 * 16, want_output=False)
    h.remove()
    experts = block.mlp.experts
    inter = experts.down_proj.shape[2]
    for e in range(4):
        own_gu, own_down = S.LinearStats(kinds=KINDS), S.LinearStats(kinds=KINDS)
        for x, top_k in seen:  # one micro-batch of 2 windows each
            for w in range(x.shape[0] // 16):
                xw, kw = x[w * 16 : (w + 1) * 16], top_k[w * 16 : (w + 1) * 16]
                mine = xw[[t for t in range(16) if e in kw[t].tolist()]]
                gate = F.linear(mine, experts.gate_up_proj[e][:inter])
                up = F.linear(mine, experts.gate_up_proj[e][inter:])
                own_gu.add_window(mine)
                own_down.add_window(experts.act_fn(gate) * up)
        for own, name in ((own_gu, f"mlp.experts.gate_up_proj[{e}]"), (own_down, f"mlp.experts.down_proj[{e}]")):
            assert own.n_tokens == st[name].n_tokens > 0 and own.n_windows == st[name].n_windows == 6
            assert torch.allclose(st[name].norms, own.norms, rtol=1e-5)
            assert torch.allclose(st[name].hessian, own.hessian, rtol=1e-4, atol=1e-6)
            assert torch.allclose(st[name].var_x, own.var_x, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the starved-expert rule


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "multiflow", "apt"])
def test_an_expert_without_tokens_is_calibrated_on_all_tokens(moe, method):
    block, family, inputs = _block(moe)
    h = _route_around(block, starved=3)
    ratios = {n: 0.5 for n in family.linears}
    out, rec = B.prune_block(block, family, inputs.hidden, inputs.kwargs, ratios, B.PruneOptions(method=method))
    cal = rec.experts["mlp.experts"]
    assert cal.routed_tokens[3] == 0 and min(cal.routed_tokens[:3]) > 0 and cal.all_tokens == (3,)
    assert sum(cal.routed_tokens) == 2 * inputs.hidden.shape[0] * inputs.hidden.shape[1]  # top-2
    assert torch.isfinite(out).all()
    for name, unit in block_linears(block, family).items():
        assert torch.isfinite(unit.weight).all(), name
        assert rec.sparsity[name] == pytest.approx(0.5, abs=0.02), name
    # the starved expert's statistics are the all-token ones; the others keep their routed tokens
    st, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, KINDS, 10**6, want_output=False)
    every, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, KINDS, 10**6, want_output=False,
                          experts=S.ExpertRule(calibrate_all=True))
    h.remove()
    for p in ("gate_up_proj", "down_proj"):
        assert torch.equal(st[f"mlp.experts.{p}[3]"].hessian, every[f"mlp.experts.{p}[3]"].hessian)
        assert not torch.equal(st[f"mlp.experts.{p}[0]"].norms, every[f"mlp.experts.{p}[0]"].norms)


def test_calibrate_all_experts_and_min_tokens(moe):
    """calibrate_all: every expert sees every token (gate_up inputs then all equal); a min_tokens above
    every expert's count gives the same statistics through the fallback pass."""
    block, family, inputs = _block(moe)
    rule = S.ExpertRule(calibrate_all=True)
    cal = {}
    every, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, KINDS, 10**6, want_output=False,
                          experts=rule, calibration=cal)
    assert cal["mlp.experts"].all_tokens == (0, 1, 2, 3) and "every expert" in cal["mlp.experts"].rule
    n = inputs.hidden.shape[0] * inputs.hidden.shape[1]
    for e in range(4):
        assert every[f"mlp.experts.gate_up_proj[{e}]"].n_tokens == n
        assert torch.equal(every[f"mlp.experts.gate_up_proj[{e}]"].norms, every["mlp.experts.gate_up_proj[0]"].norms)
    fallback, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, KINDS, 10**6, want_output=False,
                             experts=S.ExpertRule(min_tokens=n + 1), calibration=cal)
    assert cal["mlp.experts"].all_tokens == (0, 1, 2, 3)
    for name in family.linears:
        assert torch.equal(fallback[name].hessian, every[name].hessian), name
    with pytest.raises(SpecError, match="moe-min-tokens"):
        S.ExpertRule(min_tokens=0)


def test_score_block_on_moe_restores_the_fused_weights(moe):
    """The NeuroAL candidate pass prunes a copy of each fused parameter and puts the dense one back;
    its sparse output equals the final pass's at the same ratios; a starved expert scores finitely."""
    block, family, inputs = _block(moe)
    h = _route_around(block, starved=2)
    before = {n: p.clone() for n, p in block.named_parameters()}
    ratios = {n: 0.6 for n in family.linears}
    opts = B.PruneOptions(method="wanda")
    out, rec = B.score_block(block, family, inputs.hidden, inputs.kwargs, ratios, opts)
    assert all(torch.equal(p, before[n]) for n, p in block.named_parameters())
    assert set(rec.metric) == set(family.linears) and all(torch.isfinite(torch.tensor(v)) for v in rec.metric.values())
    assert rec.experts["mlp.experts"].all_tokens == (2,)
    pruned, _ = B.prune_block(block, family, inputs.hidden, inputs.kwargs, ratios, opts)
    h.remove()
    assert torch.equal(out, pruned)


def test_alignment_metric_of_an_expert_that_lost_its_tokens_is_finite():
    a = torch.tensor([1.0, 3.0])
    assert B.alignment_metric(a, torch.zeros(2)) == pytest.approx(torch.norm(a / 4).item() / 2)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("name", MOE)
def test_per_expert_checkpoint_loads_fused(name, tiny_dirs):
    """save_pretrained writes one matrix per expert (as hub checkpoints); load_full fuses them as transformers."""
    from safetensors import safe_open

    with safe_open(next(tiny_dirs[name].glob("*.safetensors")), "pt") as f:
        keys = list(f.keys())
    assert any(".experts.0." in k for k in keys) and not any("gate_up_proj" in k for k in keys)
    model, _ = load_full(tiny_dirs[name])
    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[name])
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 80, 32)
