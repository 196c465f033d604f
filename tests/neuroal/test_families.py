"""Family adapters: blocks called on their own reproduce the model; unknown architectures fail clearly."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from neuroal.block_forward import apply_head, call_block, capture_block_inputs
from neuroal.errors import UnsupportedArchitecture
from neuroal.families import family_for, get_blocks, supported_model_types
from neuroal.models import build_skeleton, load_config, load_full, materialize
from neuroal.prunable import block_linears

FAMILY_NAMES = ["llama", "llama_gqa", "mistral", "qwen2", "qwen3", "opt", "phi", "gpt_neox", "mamba", "mamba2",
                "llama3", "gemma2", "gemma3_text", "phi3", "phi3_mha", "olmo2", "mixtral", "qwen3_moe"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_blockwise_forward_equals_the_model(name, tiny_dirs):
    """Block by block with each block's own kwargs (captured at batch 1) gives the model's logits.

    20 tokens exceed the tiny Gemmas' sliding window of 8 and the tiny Phi-3's longrope
    original length of 16, so sliding masks and long rope factors are exercised.
    """
    model, family = load_full(tiny_dirs[name])
    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[name])  # the attention kernel a user gets by default
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        expect = ref(ids).logits
        inputs = capture_block_inputs(model, family, ids[:1] * 0)  # kwargs from a batch of one
        hidden = capture_block_inputs(model, family, ids).hidden
        for b, block in enumerate(get_blocks(model, family)):
            hidden = call_block(block, hidden, inputs.kwargs_for(b))
        logits = apply_head(model, family, hidden)
    assert ref.config._attn_implementation == model.config._attn_implementation
    assert torch.allclose(logits, expect, atol=1e-5, rtol=1e-5)
    assert list(block_linears(get_blocks(model, family)[0], family)) == list(family.linears)
    assert len(inputs.layer_kwargs) == len(get_blocks(model, family)) and inputs.kwargs is inputs.kwargs_for(0)


def test_unsupported_architecture_names_it_and_the_supported_list():
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2' is not supported; supported: .*llama.*mamba.*opt"):
        family_for(cfg)
    assert "qwen3" in supported_model_types()


def test_partial_load_reads_only_the_requested_tensors(tiny_dirs):
    folder = tiny_dirs["llama"]
    model = build_skeleton(load_config(folder))
    loaded = materialize(model, folder, lambda n: n.startswith("model.layers.1."))
    assert loaded and all(n.startswith("model.layers.1.") for n in loaded)
    blocks = model.model.layers
    assert blocks[1].mlp.up_proj.weight.device.type == "cpu"
    assert blocks[0].mlp.up_proj.weight.device.type == "meta"
    assert model.model.embed_tokens.weight.device.type == "meta"


def test_mamba_dt_proj_statistics_come_from_x_proj(tiny_dirs):
    """MambaMixer uses dt_proj.weight directly: its input is the first time_step_rank columns of x_proj."""
    from neuroal import block as B
    from neuroal import stats as S

    model, family = load_full(tiny_dirs["mamba"])
    ids = torch.randint(0, 1000, (2, 12))
    inputs = capture_block_inputs(model, family, ids)
    block = get_blocks(model, family)[0]
    st, _ = B._collect(block, family, inputs.hidden, inputs.kwargs, frozenset({S.NORMS}), 10**6, want_output=False)
    seen = {}
    h = block.mixer.x_proj.register_forward_hook(lambda m, a, o: seen.setdefault("x", o.detach()))
    with torch.no_grad():
        call_block(block, inputs.hidden, inputs.kwargs)
    h.remove()
    rank = block.mixer.time_step_rank
    expect = seen["x"][..., :rank].square().sum((0, 1)) / 2
    assert torch.allclose(st["mixer.dt_proj"].scaler_row, expect, rtol=1e-5)
