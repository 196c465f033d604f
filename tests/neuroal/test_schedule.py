"""Block and row schedules of OWL and NeuroAL, by hand."""

import numpy as np
import pytest
import torch

from neuroal.allocation import ratios as R
from neuroal.allocation.neuroal import row_ratios
from neuroal.allocation.schedule import (
    block_lambdas, neuroal_block_sparsity, neuroal_row_sparsity, owl_block_sparsity, row_lambdas,
)
from neuroal.families import FAMILIES, family_for
from neuroal.row_map import row_groups


def test_lambda_sets_match_the_reference():
    assert block_lambdas(0.7) == (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.15, 0.2, 0.25)
    assert block_lambdas(0.8)[-1] == 0.2 and len(block_lambdas(0.8)) == 13
    assert row_lambdas()[0] == 0.0 and row_lambdas()[1:] == block_lambdas(0.5)


def test_block_ramp_by_hand():
    # L=5, s=0.7, λ=0.1: ramp 1..5 -> [0, .05, .1, .15, .2] -> -0.1 mean + 0.3 -> sorted desc
    # densities [.4, .35, .3, .25, .2] -> sparsities [.6, .65, .7, .75, .8]
    assert np.allclose(neuroal_block_sparsity(5, 0.7, 0.1), [0.6, 0.65, 0.7, 0.75, 0.8])


@pytest.mark.parametrize("L,s,lam", [(30, 0.7, 0.25), (32, 0.5, 0.08), (7, 0.6, 0.02)])
def test_block_ramp_keeps_the_mean_and_window(L, s, lam):
    v = neuroal_block_sparsity(L, s, lam)
    assert v.mean() == pytest.approx(s)
    assert v[0] == pytest.approx(s - lam) and v[-1] == pytest.approx(s + lam)
    assert (np.diff(v) > 0).all()


def test_block_clip_rule_is_the_reference_one():
    # s=0.95, λ=0.25: top blocks would exceed 1 -> 0.99; values in (0,1) untouched
    v = neuroal_block_sparsity(3, 0.95, 0.25)
    assert v.tolist() == pytest.approx([0.7, 0.95, 0.99])


def test_owl_by_hand():
    d = [1.0, 3.0, 2.0]  # more outliers -> less sparsity
    v = owl_block_sparsity(d, 0.5, 0.08)
    assert v.tolist() == pytest.approx([0.58, 0.42, 0.5])
    assert v.mean() == pytest.approx(0.5)


def test_row_schedule_by_hand_and_clip():
    r = np.array([0.0, 1.0, 2.0, 3.0])
    s = neuroal_row_sparsity(r, 0.7, 0.1)
    # g = [0, 1/3, 2/3, 1]*0.2 -> minus mean 0.1 plus 0.3 -> densities [.2, .2667, .3333, .4]
    assert s.tolist() == pytest.approx([0.8, 0.7333333, 0.6666667, 0.6])
    assert neuroal_row_sparsity(r, 0.98, 0.25).max() == 0.99  # np.clip to [0.01, 0.99]
    assert neuroal_row_sparsity(np.zeros(4), 0.7, 0.2).tolist() == [0.7] * 4  # all-zero r: uniform


def test_row_groups_llama_full_attention_vs_gqa():
    fam = family_for(type("C", (), {"model_type": "llama"}))
    full = {n: (32, 32) for n in fam.linears[:4]} | {"mlp.gate_proj": (37, 32), "mlp.up_proj": (37, 32), "mlp.down_proj": (32, 37)}
    groups, kept = row_groups(fam, full, has_next=True)
    assert dict(groups) == {
        "self_attn.o_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp.gate_proj": ("self_attn.o_proj",),
        "mlp.down_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "next:self_attn.q_proj": ("mlp.down_proj",),
    }
    assert kept == []
    gqa = dict(full, **{"self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32)})
    groups, kept = row_groups(fam, gqa, has_next=True)
    assert "self_attn.o_proj" not in dict(groups)
    assert kept == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    groups, _ = row_groups(fam, full, has_next=False)
    assert "next:self_attn.q_proj" not in dict(groups)


def test_neuroal_rows_maps_consumers_to_producers():
    fam = family_for(type("C", (), {"model_type": "llama"}))
    shapes = {n: (4, 4) for n in fam.linears}
    base = R.uniform(2, fam.linears, 0.5)
    r = {n: torch.arange(4, dtype=torch.float32) * (i + 1) for i, n in enumerate(fam.linears)}
    align = {0: r, 1: {n: torch.flip(v, [0]) for n, v in r.items()}}
    ratios, notes = row_ratios(fam, shapes, base, align, 0.1)
    expect_up = neuroal_row_sparsity(r["mlp.down_proj"].numpy(), 0.5, 0.1)
    assert np.allclose(ratios[0]["mlp.up_proj"], expect_up) and np.allclose(ratios[0]["mlp.gate_proj"], expect_up)
    assert np.allclose(ratios[0]["self_attn.v_proj"], neuroal_row_sparsity(r["self_attn.o_proj"].numpy(), 0.5, 0.1))
    assert np.allclose(ratios[0]["self_attn.o_proj"], neuroal_row_sparsity(r["mlp.gate_proj"].numpy(), 0.5, 0.1))
    # down_proj's rows come from the NEXT block's first linear (q_proj of block 1)
    assert np.allclose(ratios[0]["mlp.down_proj"], neuroal_row_sparsity(align[1]["self_attn.q_proj"].numpy(), 0.5, 0.1))
    assert all(np.allclose(v, 0.5) for v in ratios[1].values())  # last block: uniform rows
    assert notes == []


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_row_map_names_are_linears(fam):
    for consumer, producers in fam.row_map:
        assert consumer in fam.linears and set(producers) <= set(fam.linears)
