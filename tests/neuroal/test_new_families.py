"""Dense architectures users bring (issue 13): Llama 3, Gemma 2/3, Phi-3/4, OLMo 2.

The block-by-block forward of every family is in `test_families.py`; here are what these
architectures add: per-block kwargs (sliding-window and full attention, local and global rotary
tables), the soft-capped tied head, fused linears in the row step, and partial loading.
"""

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from neuroal.allocation.schedule import neuroal_row_sparsity
from neuroal.block_forward import call_block, capture_block_inputs
from neuroal.errors import UnsupportedArchitecture
from neuroal.families import family_for, get_blocks
from neuroal.models import build_skeleton, load_config, load_full, materialize
from neuroal.row_map import producer_rows, row_groups


@pytest.mark.parametrize(
    "model_type, family",
    [("llama", "llama"), ("gemma2", "gemma2"), ("gemma3_text", "gemma3"), ("phi3", "phi3"), ("olmo2", "llama")],
)
def test_family_for_maps_the_new_model_types(model_type, family):
    assert family_for(AutoConfig.for_model(model_type)).name == family


@pytest.mark.parametrize("model_type", ["gemma", "gemma3", "phi3small"])
def test_other_model_types_still_fail_clearly(model_type):
    """Gemma 1 and the multimodal Gemma 3 wrapper are not adapted: refused by model_type, not guessed."""
    cfg = type("Config", (), {"model_type": model_type})()
    supported = r"supported: .*gemma2, gemma3_text, .*olmo2, opt, phi, phi3"
    with pytest.raises(UnsupportedArchitecture, match=rf"'{model_type}' is not supported; {supported}"):
        family_for(cfg)


def test_gemma_blocks_get_their_own_mask_and_rotary_table(tiny_dirs):
    """Sliding layers share one kwargs dict, the full-attention layer has another; batch-1 masks broadcast."""
    model, family = load_full(tiny_dirs["gemma3_text"])
    ids = torch.randint(0, 1000, (3, 20))
    inputs = capture_block_inputs(model, family, ids[:1])
    sliding, full, sliding_again = inputs.layer_kwargs
    assert sliding is sliding_again and sliding is not full
    assert sliding["attention_mask"].shape == (1, 1, 20, 20) and sliding["attention_mask"].dtype == torch.bool
    assert full["attention_mask"] is None  # SDPA: the full causal mask stays implicit
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # local vs global rope
    with torch.no_grad():  # block 0's kwargs everywhere (what the shards do today) is not the model
        hidden = capture_block_inputs(model, family, ids).hidden
        right, wrong = hidden, hidden
        for b, block in enumerate(get_blocks(model, family)):
            right, wrong = call_block(block, right, inputs.kwargs_for(b)), call_block(block, wrong, inputs.kwargs)
    assert not torch.allclose(right, wrong, atol=1e-3)
    short = capture_block_inputs(model, family, ids[:1, :7])  # shorter than the window of 8: no mask at all
    assert short.layer_kwargs[0]["attention_mask"] is None


def test_gemma2_is_eager_with_float_masks(tiny_dirs):
    """Gemma 2 refuses SDPA (attention soft-capping): eager masks are [1, 1, S, S] additive floats."""
    model, family = load_full(tiny_dirs["gemma2"])
    assert family.attn_implementation == "eager" and model.config._attn_implementation == "eager"
    inputs = capture_block_inputs(model, family, torch.zeros(1, 12, dtype=torch.long))
    sliding, full = inputs.layer_kwargs[0]["attention_mask"], inputs.layer_kwargs[1]["attention_mask"]
    assert sliding.shape == full.shape == (1, 1, 12, 12) and sliding.dtype == torch.float32
    assert (sliding[0, 0, 11] == 0).sum() == 8 and (full[0, 0, 11] == 0).sum() == 12


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_head_soft_caps_the_tied_logits(name, tiny_dirs):
    model, family = load_full(tiny_dirs[name])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        expect = model(ids).logits
        last = model.model(ids).last_hidden_state  # after the final norm: only the lm head and the cap remain
        raw = model.lm_head(last)
    cap = getattr(model.config, family.logit_softcap)
    assert torch.allclose(expect, torch.tanh(raw / cap) * cap, atol=1e-6)
    assert not torch.allclose(expect, raw, atol=1e-3)  # the cap matters on these logits


@pytest.mark.parametrize("name", ["llama3", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_capture_on_a_skeleton_with_only_the_embeddings(name, tiny_dirs):
    """Shard 0 captures with its later blocks and the head on meta: only embeddings and rotary run."""
    full, family = load_full(tiny_dirs[name])
    skeleton = build_skeleton(load_config(tiny_dirs[name]))
    loaded = materialize(skeleton, tiny_dirs[name], lambda n: not n.startswith(family.blocks + ".") and "norm" not in n)
    assert loaded and all(p.device.type == "meta" for p in get_blocks(skeleton, family).parameters())
    ids = torch.randint(0, 1000, (1, 20))
    got, expect = capture_block_inputs(skeleton, family, ids), capture_block_inputs(full, family, ids)
    assert torch.equal(got.hidden, expect.hidden)
    for a, b in zip(got.layer_kwargs, expect.layer_kwargs, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], tuple):
                assert all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True))
            elif isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("name", ["llama3", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_checkpoint_loads_by_tensor_name(name, tiny_dirs):
    """Every saved tensor maps to a model parameter (renames included), and one block loads alone."""
    model, family = load_full(tiny_dirs[name])
    assert all(p.device.type == "cpu" for p in model.parameters())
    skeleton = build_skeleton(load_config(tiny_dirs[name]))
    prefix = f"{family.blocks}.1."
    loaded = materialize(skeleton, tiny_dirs[name], lambda n: n.startswith(prefix))
    assert sorted(loaded) == sorted(n for n, _ in skeleton.named_parameters() if n.startswith(prefix))
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in skeleton.named_parameters() if n.startswith(prefix))


def test_llama3_rope_scaling_and_tied_head(tiny_dirs):
    model, family = load_full(tiny_dirs["llama3"])
    assert family.name == "llama" and model.config.rope_parameters["rope_type"] == "llama3"
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------ fused linears in the row step


def _phi3_shapes(kv_heads: int) -> dict[str, tuple[int, int]]:
    """hidden 8, 2 heads of 4 (o_proj reads q's 8 rows), intermediate 3."""
    qkv = 8 + 2 * 4 * kv_heads
    return {"self_attn.qkv_proj": (qkv, 8), "self_attn.o_proj": (8, 8),
            "mlp.gate_up_proj": (6, 8), "mlp.down_proj": (8, 3)}


def test_row_segments_name_producers_of_the_row_map():
    fam = family_for(AutoConfig.for_model("phi3"))
    producers = {p for _, ps in fam.row_map for p in ps}
    assert {p for p, _ in fam.row_segments} <= producers and fam.segments("self_attn.o_proj") == 1


def test_fused_rows_by_hand():
    fam = family_for(AutoConfig.for_model("phi3"))
    mha, gqa = _phi3_shapes(kv_heads=2), _phi3_shapes(kv_heads=1)
    r_down = np.array([1.0, 2.0, 3.0])  # down_proj's change, one per intermediate channel
    assert producer_rows(r_down, fam, "mlp.gate_up_proj", mha).tolist() == [1, 2, 3, 1, 2, 3]  # [gate | up]
    r_o = np.arange(8.0)
    assert producer_rows(r_o, fam, "self_attn.qkv_proj", mha).tolist() == [*r_o, *r_o, *r_o]  # [q | k | v]
    assert producer_rows(r_o, fam, "self_attn.qkv_proj", gqa) is None  # k, v narrower than q: block ratio
    assert producer_rows(r_o, fam, "self_attn.o_proj", mha).tolist() == r_o.tolist()  # plain producer


def test_row_groups_with_fused_producers():
    fam = family_for(AutoConfig.for_model("phi3"))
    groups, kept = row_groups(fam, _phi3_shapes(kv_heads=2), has_next=True)
    assert dict(groups) == {
        "self_attn.o_proj": ("self_attn.qkv_proj",),
        "mlp.gate_up_proj": ("self_attn.o_proj",),
        "mlp.down_proj": ("mlp.gate_up_proj",),
        "next:self_attn.qkv_proj": ("mlp.down_proj",),
    }
    assert kept == []
    groups, kept = row_groups(fam, _phi3_shapes(kv_heads=1), has_next=True)
    assert "self_attn.o_proj" not in dict(groups) and kept == ["self_attn.qkv_proj"]


def test_tiled_change_gives_each_segment_the_consumer_schedule():
    """minmax and mean are the same over k copies, so the row schedule of the tiled r is the tiled schedule."""
    fam = family_for(AutoConfig.for_model("phi3"))
    r = np.array([0.3, 0.0, 2.0])
    rows = neuroal_row_sparsity(producer_rows(r, fam, "mlp.gate_up_proj", _phi3_shapes(2)), 0.6, 0.1)
    assert rows.shape == (6,) and np.allclose(rows, np.tile(neuroal_row_sparsity(r, 0.6, 0.1), 2))
