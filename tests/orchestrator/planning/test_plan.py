"""The shard planner: real 7B/70B shapes from config.json alone, hand-counted tiny configs, every family."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoConfig, LlamaConfig

from neuroal.errors import ModelLoadError, SpecError, UnsupportedArchitecture
from orchestrator.planning import (
    Plan,
    ShardSpec,
    format_bytes,
    load_plan_config,
    measure_model,
    parse_bytes,
    plan_lines,
    plan_shards,
    render_plan,
)

GB = 10**9

# Published shapes (config.json of the hub checkpoints), written to disk so the loader is tested too.
LLAMA2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
LLAMA3_70B = {
    **LLAMA2_70B,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
LLAMA2_7B = {
    **LLAMA2_70B,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


# Published config.json of the hub checkpoints the issue names (meta-llama/Llama-3.1-70B,
# google/gemma-2-27b, mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B), transformers_version left out.
LLAMA31_70B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 8192,
    "initializer_range": 0.02,
    "intermediate_size": 28672,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
GEMMA2_27B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 128,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 4608,
    "initializer_range": 0.02,
    "intermediate_size": 36864,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 32,
    "num_hidden_layers": 46,
    "num_key_value_heads": 16,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 144,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "sliding_window_size": 4096,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 256000,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# name -> (config, published parameter count)
PUBLISHED = {
    "llama3.1-70b": (LLAMA31_70B, 70.6e9),
    "gemma2-27b": (GEMMA2_27B, 27.2e9),
    "mixtral-8x7b": (MIXTRAL_8X7B, 46.7e9),
    "qwen3-30b-a3b": (QWEN3_30B_A3B, 30.5e9),
}


@pytest.fixture(scope="module")
def config_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, data in {
        "llama2-70b": LLAMA2_70B,
        "llama3-70b": LLAMA3_70B,
        "llama2-7b": LLAMA2_7B,
        "smollm2-135m": SMOLLM2_135M,
        **{name: data for name, (data, _) in PUBLISHED.items()},
    }.items():
        path = root / name / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(data))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def configs(config_files):
    return {name: load_plan_config(str(path)) for name, path in config_files.items()}


def tiny_llama(**kw) -> LlamaConfig:
    """LlamaModelTester sizes; per block params counted by hand in `TINY_BLOCK`."""
    args = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    args.update(kw)
    return LlamaConfig(**args)


# q 32·32 + k 32·16 + v 32·16 + o 32·32 + gate/up/down 3·32·37 + two RMSNorms 2·32
TINY_BLOCK = 1024 + 512 + 512 + 1024 + 3 * 1184 + 64
TINY_EMBED = 99 * 32
TINY_HEAD = 32 + 99 * 32  # final norm + lm_head


SHARD_KEYS = {
    "index",
    "first_block",
    "last_block",
    "end_block",
    "n_blocks",
    "has_embeddings",
    "has_head",
    "block_param_bytes",
    "param_bytes",
    "activation_bytes",
    "total_bytes",
    "activation",
}


def check_invariants(plan: Plan) -> None:
    """Contiguous, every block exactly once, embeddings first, head last, bytes add up, fits."""
    covered = [b for s in plan.shards for b in s.blocks]
    assert covered == list(range(plan.n_blocks))
    for k, s in enumerate(plan.shards):
        assert s.index == k
        assert s.first_block <= s.last_block
        assert s.has_embeddings == (k == 0)
        assert s.has_head == (k == plan.n_actors - 1)
        assert s.block_param_bytes == sum(plan.block_param_bytes[b] for b in s.blocks)
        assert s.param_bytes >= s.block_param_bytes
        assert s.total_bytes == s.param_bytes + s.activation_bytes
        assert s.total_bytes <= plan.budget_bytes
        assert (s.activation.logits > 0) == s.has_head
        assert s.n_blocks == len(s.blocks) == s.end_block - s.first_block == s.last_block - s.first_block + 1
        assert set(s.to_dict()) == SHARD_KEYS
    # the ranges the shards are built from are the plan's own, one type end to end
    assert plan.shard_specs() == [
        ShardSpec(s.index, plan.n_actors, s.first_block, s.end_block, s.has_embeddings, s.has_head)
        for s in plan.shards
    ]
    json.dumps(plan.to_dict())  # JSON-clean


# ----------------------------------------------------------------------------------------------
# real shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-70b"])
def test_70b_on_8x80gb(configs, name):
    plan = plan_shards(configs[name], n_actors=8, mem_per_actor=parse_bytes("80GB"), dtype="bfloat16")
    check_invariants(plan)
    assert plan.n_blocks == 80 and plan.n_actors == 8
    assert [s.n_blocks for s in plan.shards] == [10] * 8
    for s in plan.shards:
        assert 16 * GB < s.block_param_bytes < 18 * GB  # ~17.1 GB of weights per 10 blocks
        assert 18 * GB < s.activation_bytes < 26 * GB
        # the final pass holds all 128 windows of 2048 tokens as one stream, its input and its output
        assert s.activation.streams == 2 * 128 * 2048 * 8192 * 2
    vocab = configs[name].vocab_size
    assert plan.shards[0].param_bytes - plan.shards[0].block_param_bytes == vocab * 8192 * 2
    assert plan.shards[-1].param_bytes - plan.shards[-1].block_param_bytes == (vocab * 8192 + 8192) * 2
    assert sum(s.param_bytes for s in plan.shards) == plan.total_params * 2  # untied: nothing duplicated
    assert 68e9 < plan.total_params < 71e9


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-70b"])
def test_70b_on_4x80gb(configs, name):
    plan = plan_shards(configs[name], n_actors=4, mem_per_actor=parse_bytes("80GB"))
    check_invariants(plan)
    assert [s.n_blocks for s in plan.shards] == [20] * 4
    assert plan.max_total_bytes < 72 * GB


def test_70b_fewest_actors_and_too_few(configs):
    plan = plan_shards(configs["llama3-70b"], mem_per_actor=parse_bytes("80GB"))
    check_invariants(plan)
    assert plan.n_actors == 3  # 141 GB of weights + ~15 GB activations per actor in 72 GB budgets
    with pytest.raises(SpecError) as err:
        plan_shards(configs["llama3-70b"], n_actors=2, mem_per_actor=parse_bytes("80GB"))
    assert err.value.field == "--gpu-mem"
    assert "for 2 actors" in str(err.value) and "--gpus >= 3" in str(err.value)


def test_70b_sparsegpt_adds_hessians(configs):
    wanda = plan_shards(configs["llama2-70b"], n_actors=8, mem_per_actor=parse_bytes("80GB"))
    sgpt = plan_shards(configs["llama2-70b"], n_actors=8, mem_per_actor=parse_bytes("80GB"), method="sparsegpt")
    check_invariants(sgpt)
    assert wanda.shards[1].activation.hessians == 0
    h = sgpt.shards[1].activation.hessians
    # one fp32 XᵀX per linear (six of width 8192, down_proj 28672) + solver workspace on down_proj
    expected = (6 * 8192**2 + 28672**2 + 4 * 28672**2 + 8192 * 28672) * 4
    assert h == expected
    assert sgpt.shards[1].activation_bytes == wanda.shards[1].activation_bytes + h


# The four: fewest 80 GB actors at the CLI defaults (bf16, 2 streams x 8 windows x 2048
# tokens, 10% headroom: a 72 GB budget), counted from the estimate's terms:
#   Llama-3.1-70B  wanda 3 (~47 GB weights + 14.5 GB each)   sparsegpt 4 (+19 GB of Hessians per actor)
#   Gemma-2-27B    wanda 2 (~28 GB + 14-19 GB)               sparsegpt 3 (+28 GB: down_proj's 36864² XᵀX
#                                                            and its OBS workspace)
#   Mixtral-8x7B   wanda 2 (46.7 GB + 14-15 GB)              sparsegpt 3 (+11 GB: 8 experts' Hessians)
#   Qwen3-30B-A3B  wanda 1 (61.1 GB + 8.6 GB of 72 GB)       sparsegpt 2 (+2.9 GB of 128 experts' Hessians:
#                                                            72.6 GB on one actor does not fit)
PUBLISHED_ACTORS = {
    ("llama3.1-70b", "wanda"): 3,
    ("llama3.1-70b", "sparsegpt"): 5,
    ("gemma2-27b", "wanda"): 2,
    ("gemma2-27b", "sparsegpt"): 3,
    ("mixtral-8x7b", "wanda"): 2,
    ("mixtral-8x7b", "sparsegpt"): 3,
    ("qwen3-30b-a3b", "wanda"): 1,
    ("qwen3-30b-a3b", "sparsegpt"): 2,
}


@pytest.mark.parametrize("name,method", sorted(PUBLISHED_ACTORS))
def test_published_configs_plan_on_80gb(config_files, configs, name, method):
    from rich.console import Console
    from typer.testing import CliRunner

    from orchestrator.cli import app

    cfg, published = configs[name], PUBLISHED[name][1]
    plan = plan_shards(cfg, mem_per_actor=parse_bytes("80GB"), method=method)
    check_invariants(plan)
    assert abs(plan.total_params - published) / published < 0.01
    assert plan.n_blocks == cfg.num_hidden_layers
    # bf16 weights: every unique parameter once, plus the tied head's copy on the last shard
    tied_copy = cfg.vocab_size * cfg.hidden_size * 2 if plan.tied_embeddings and plan.n_actors > 1 else 0
    assert sum(s.param_bytes for s in plan.shards) == plan.total_params * 2 + tied_copy
    assert plan.n_actors == PUBLISHED_ACTORS[name, method]
    assert plan.n_actors >= math.ceil(plan.total_params * 2 / plan.budget_bytes)  # weights alone need that many
    assert (plan.shards[0].activation.hessians > 0) == (method == "sparsegpt")
    if plan.n_actors > 1:  # the fewest: one actor less does not fit
        with pytest.raises(SpecError):
            plan_shards(cfg, mem_per_actor=parse_bytes("80GB"), n_actors=plan.n_actors - 1, method=method)

    # the same plan through `neuroal plan --model <config.json>`, printed and written as JSON
    out = config_files[name].parent / f"plan-{method}.json"
    result = CliRunner().invoke(
        app, ["plan", "--model", str(config_files[name]), "--method", method, "--json", str(out)], env={"COLUMNS": "160"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json.loads(json.dumps(plan.to_dict()))
    text = " ".join(result.output.split())  # rich wraps the title and caption to the table's width
    title = f"{cfg.model_type}: {plan.n_blocks} blocks, {plan.total_params / 1e9:.2f}B params"
    assert title in text and f"{plan.n_actors} actor(s) x 80.0 GB" in text and f"method {method}" in text
    for s in plan.shards:
        assert f"{s.first_block}-{s.last_block}" in text and format_bytes(s.total_bytes) in text
    # it is `render_plan`'s table, one row per actor
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(render_plan(plan))
    assert " ".join(console.export_text().split()) == text
    assert render_plan(plan).row_count == plan.n_actors == len(plan_lines(plan)) - 3


def test_published_shapes(configs):
    """The config fields that change the shapes are read: llama3 rope, Gemma 2's head_dim, the experts."""
    llama = configs["llama3.1-70b"]
    rope = getattr(llama, "rope_parameters", None) or llama.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    gemma = measure_model(configs["gemma2-27b"])
    assert dict((n, (o, i)) for n, o, i in gemma.blocks[0].linears)["self_attn.q_proj"] == (32 * 128, 4608)
    assert gemma.tied_params == 256000 * 4608
    for name, E, k, I in (("mixtral-8x7b", 8, 2, 14336), ("qwen3-30b-a3b", 128, 8, 768)):
        block = measure_model(configs[name]).blocks[0]
        d = configs[name].hidden_size
        assert (block.n_experts, block.experts_per_token) == (E, k)
        assert len(block.experts) == 2 * E and len(block.linears) == 4 + 2 * E
        assert block.expert_params == E * 3 * d * I
        assert block.routed_width == k * (2 * I + d + d + I)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_moe_activation_terms_by_hand(configs, name):
    """Routed tokens' activations (k of E experts per token); per-expert Hessians and sums for every expert."""
    cfg = configs[name]
    d, E, k = cfg.hidden_size, 8 if name.startswith("mixtral") else 128, cfg.num_experts_per_tok
    I = cfg.intermediate_size if name.startswith("mixtral") else cfg.moe_intermediate_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    wanda = plan_shards(cfg, n_actors=4, mem_per_actor=parse_bytes("80GB"))
    sgpt = plan_shards(cfg, n_actors=4, mem_per_actor=parse_bytes("80GB"), method="sparsegpt")
    act, T, e = wanda.shards[1].activation, 8 * 2048, 2
    attn_out, attn_in = [q, kv, kv, d], [d, d, d, q]  # q, k, v, o
    assert act.working_set == T * (sum(attn_out) + k * (d + 2 * I + I + d) + max(attn_in + [I]) + 2 * d) * e
    assert act.stats_upcast == 2 * T * max(attn_in + [I]) * 4  # one expert may get every token
    assert act.linear_stats == 4 * (sum(attn_in) + E * (d + I)) * 4
    block = measure_model(cfg).blocks[1]
    assert act.candidate_copy == (block.params + E * 3 * d * I) * e
    widest = max([(i, o) for o, i in zip(attn_out, attn_in)] + [(d, 2 * I), (I, d)])
    per_expert = E * (d * d + I * I)  # gate_up's [d, d] and down's [I, I] XᵀX, for every expert
    h = (sum(i * i for i in attn_in) + per_expert + 4 * widest[0] ** 2 + widest[0] * widest[1]) * 4
    assert sgpt.shards[1].activation.hessians == h
    assert sgpt.shards[1].activation_bytes == act.total + h


def test_7b_fits_one_24gb(configs):
    # the papers' final pass (128 windows of 2048 tokens, 4.3 GB in and out) needs a second 24 GB
    # actor; 32 windows fit one
    assert plan_shards(configs["llama2-7b"], mem_per_actor=parse_bytes("24GB")).n_actors == 2
    plan = plan_shards(configs["llama2-7b"], mem_per_actor=parse_bytes("24GB"), nsamples=32)
    check_invariants(plan)
    assert plan.n_actors == 1
    (only,) = plan.shards
    assert only.has_embeddings and only.has_head and only.n_blocks == 32
    assert 13 * GB < only.param_bytes < 14 * GB


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_smollm2_splits(configs, k):
    plan = plan_shards(configs["smollm2-135m"], n_actors=k, mem_per_actor=parse_bytes("24GB"))
    check_invariants(plan)
    assert plan.n_actors == k and plan.tied_embeddings
    # memory is plentiful: blocks are as even as a contiguous split allows
    assert max(s.n_blocks for s in plan.shards) == math.ceil(30 / k)


def test_smollm2_tied_head_duplicated_on_last_shard(configs):
    one = plan_shards(configs["smollm2-135m"], n_actors=1, mem_per_actor=parse_bytes("24GB"))
    two = plan_shards(configs["smollm2-135m"], n_actors=2, mem_per_actor=parse_bytes("24GB"))
    embed = 49152 * 576 * 2
    assert one.shards[0].param_bytes == one.total_params * 2  # one copy when one actor has both
    assert sum(s.param_bytes for s in two.shards) == two.total_params * 2 + embed
    assert two.shards[1].param_bytes - two.shards[1].block_param_bytes == embed + 576 * 2


def test_fewest_is_minimal(configs):
    cfg = configs["smollm2-135m"]
    plan = plan_shards(cfg, mem_per_actor=parse_bytes("2GB"), nsamples=32)
    check_invariants(plan)
    assert plan.n_actors > 1
    with pytest.raises(SpecError):
        plan_shards(cfg, n_actors=plan.n_actors - 1, mem_per_actor=parse_bytes("2GB"), nsamples=32)


@pytest.mark.slow
def test_embedded_default_config():
    cfg = load_plan_config("smollm2-135m")
    plans = [plan_shards(cfg, n_actors=k, mem_per_actor=parse_bytes("24GB")) for k in (1, 2, 3, 4)]
    for plan in plans:
        check_invariants(plan)
        assert plan.n_blocks == 30 and 134e6 < plan.total_params < 136e6


# ----------------------------------------------------------------------------------------------
# hand-counted bytes and the activation formula
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,e", [("bfloat16", 2), ("float16", 2), ("float32", 4), ("bf16", 2)])
def test_bytes_match_hand_count(dtype, e):
    plan = plan_shards(tiny_llama(), n_actors=2, mem_per_actor=parse_bytes("1GB"), dtype=dtype, seqlen=16)
    check_invariants(plan)
    assert plan.block_param_bytes == (TINY_BLOCK * e,) * 4
    assert plan.total_params == 4 * TINY_BLOCK + TINY_EMBED + TINY_HEAD
    first, last = plan.shards
    assert (first.first_block, first.last_block, last.first_block, last.last_block) == (0, 1, 2, 3)
    assert first.block_param_bytes == 2 * TINY_BLOCK * e
    assert first.param_bytes == (2 * TINY_BLOCK + TINY_EMBED) * e
    assert last.param_bytes == (2 * TINY_BLOCK + TINY_HEAD) * e


def test_tied_tiny_counts_once_per_shard():
    cfg = tiny_llama(tie_word_embeddings=True)
    one = plan_shards(cfg, n_actors=1, mem_per_actor=parse_bytes("1GB"), seqlen=16)
    two = plan_shards(cfg, n_actors=2, mem_per_actor=parse_bytes("1GB"), seqlen=16)
    assert one.total_params == 4 * TINY_BLOCK + TINY_EMBED + 32
    assert one.shards[0].param_bytes == one.total_params * 2
    assert two.shards[1].param_bytes == (2 * TINY_BLOCK + TINY_HEAD) * 2  # the head's copy of the embedding


def test_evaluation_plan_counts_the_head_in_the_pace():
    # vocab 417: final norm + lm head = 32 + 417·32 = 13,376 = exactly two tiny blocks
    cfg = tiny_llama(vocab_size=417)
    assert 32 + 417 * 32 == 2 * TINY_BLOCK
    prune = plan_shards(cfg, n_actors=2, mem_per_actor=parse_bytes("1GB"), seqlen=16)
    evaluate = plan_shards(cfg, n_actors=2, mem_per_actor=parse_bytes("1GB"), seqlen=16, head_runs=True)
    for plan in (prune, evaluate):
        check_invariants(plan)
    # blocks alone: 2 + 2; with the head (worth 2 blocks) 2 + 2 would pace at 4 blocks, 3 + 1 at 3
    assert [s.n_blocks for s in prune.shards] == [2, 2] and not prune.head_runs
    assert [s.n_blocks for s in evaluate.shards] == [3, 1] and evaluate.to_dict()["head_runs"]


def test_smollm2_evaluation_split(configs):
    # a block is 3,540,096 parameters; the tied head + norm 49,152·576 + 576 = 7.998 blocks:
    # 19 + (11 + 8.0) paces at 19 blocks, 18 + (12 + 8.0) at 20.0, 20 + (10 + 8.0) at 20
    plan = plan_shards(configs["smollm2-135m"], n_actors=2, mem_per_actor=parse_bytes("24GB"), nsamples=1,
                       head_runs=True)
    check_invariants(plan)
    assert [s.n_blocks for s in plan.shards] == [19, 11]


def test_activation_terms_by_hand():
    K, W, S, d, e = 3, 4, 16, 32, 2
    plan = plan_shards(
        tiny_llama(), n_actors=2, mem_per_actor=parse_bytes("1GB"), streams_in_flight=K, stream_windows=W, seqlen=S,
        nsamples=7,
    )
    act = plan.shards[0].activation
    T = W * S  # below the micro-batch cap
    sum_out = 32 + 16 + 16 + 32 + 37 + 37 + 32
    sum_in = 6 * 32 + 37
    assert act.streams == (K + 1) * W * S * d * e  # 16 windows: more than the final pass's 2 x 7
    final = plan_shards(tiny_llama(), n_actors=2, mem_per_actor=parse_bytes("1GB"), streams_in_flight=K,
                        stream_windows=W, seqlen=S, nsamples=9).shards[0].activation
    assert final.streams == 2 * 9 * S * d * e and final.total - final.streams == act.total - act.streams
    assert act.working_set == T * (sum_out + 37 + 2 * d) * e
    assert act.stats_upcast == 2 * T * 37 * 4
    assert act.linear_stats == 4 * sum_in * 4
    assert act.hessians == 0
    assert act.candidate_copy == TINY_BLOCK * e
    assert act.mask_workspace == 32 * 37 * 17
    assert act.logits == 0
    assert plan.shards[1].activation.logits == S * 99 * (e + 8)
    assert act.total == sum(v for k, v in act.to_dict().items() if k != "total")


def test_micro_batch_caps_working_set(configs):
    small = plan_shards(configs["llama2-7b"], n_actors=1, mem_per_actor=parse_bytes("80GB"), stream_windows=16,
                        nsamples=1)
    large = plan_shards(configs["llama2-7b"], n_actors=1, mem_per_actor=parse_bytes("80GB"), stream_windows=64,
                        nsamples=1)
    # forwards run in micro-batches of at most DEFAULT_MAX_TOKENS tokens; only the streams grow
    assert small.shards[0].activation.working_set == large.shards[0].activation.working_set
    assert large.shards[0].activation.streams == 4 * small.shards[0].activation.streams


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_does_not_fit_names_gpu_mem(configs):
    with pytest.raises(SpecError) as err:
        plan_shards(configs["llama2-70b"], mem_per_actor=parse_bytes("8GB"))
    assert err.value.field == "--gpu-mem"
    assert "per actor" in str(err.value) and ">=" in str(err.value)
    minimum = parse_bytes(str(err.value).split(">= ")[1].split(" per actor")[0].replace(" ", ""))
    plan = plan_shards(configs["llama2-70b"], mem_per_actor=minimum)  # the stated minimum works
    check_invariants(plan)
    assert plan.n_actors == 80


def test_too_many_gpus():
    with pytest.raises(SpecError) as err:
        plan_shards(tiny_llama(), n_actors=5, mem_per_actor=parse_bytes("1GB"))
    assert err.value.field == "--gpus"


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"dtype": "int8"}, "--dtype"),
        ({"method": "wandaa"}, "--method"),
        ({"headroom": 1.0}, "--headroom"),
        ({"seqlen": 0}, "--seqlen"),
        ({"n_actors": 0}, "--gpus"),
        ({"mem_per_actor": "lots"}, "--gpu-mem"),
    ],
)
def test_bad_arguments(kw, field):
    args = {"mem_per_actor": parse_bytes("1GB"), **kw}
    with pytest.raises(SpecError) as err:
        plan_shards(tiny_llama(), **args)
    assert err.value.field == field


def test_unsupported_family():
    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=99)
    with pytest.raises(UnsupportedArchitecture):
        plan_shards(cfg, mem_per_actor=parse_bytes("1GB"))


# ----------------------------------------------------------------------------------------------
# other families
# ----------------------------------------------------------------------------------------------

_GQA = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TINY_FAMILIES = {
    "mistral": dict(_GQA),
    "qwen2": dict(_GQA),
    "qwen3": dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ),
    "opt": dict(
        vocab_size=99,
        hidden_size=32,
        ffn_dim=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "phi": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4),
    "gpt_neox": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4),
    "mamba": dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, state_size=4, expand=2, conv_kernel=4),
    # issue 13's families
    "gemma2": dict(_GQA, head_dim=8, sliding_window=8, query_pre_attn_scalar=8),
    "gemma3_text": dict(_GQA, head_dim=8, sliding_window=8, query_pre_attn_scalar=8),
    "phi3": dict(_GQA, pad_token_id=0),
    "olmo2": dict(_GQA, pad_token_id=0, eos_token_id=0),
    "mixtral": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_GQA, head_dim=8, moe_intermediate_size=37, num_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("k", [None, 1, 3])
def test_other_families(model_type, k):
    cfg = AutoConfig.for_model(model_type, **TINY_FAMILIES[model_type])
    plan = plan_shards(cfg, n_actors=k, mem_per_actor=parse_bytes("1GB"), seqlen=32, method="sparsegpt")
    check_invariants(plan)
    assert plan.model_type == model_type and plan.n_blocks == 3
    assert plan.n_actors == (k or 1)
    assert all(s.activation.hessians > 0 for s in plan.shards)
    layout = measure_model(cfg)
    skeleton_total = layout.pre_params + sum(b.params for b in layout.blocks) + layout.post_params
    assert plan.total_params == skeleton_total - layout.tied_params


# ----------------------------------------------------------------------------------------------
# sizes, loading, rendering
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("80GB", 80 * 10**9),
        ("80GiB", 80 * 2**30),
        ("24G", 24 * 10**9),
        ("24Gi", 24 * 2**30),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("1.5TB", 15 * 10**11),
        ("80 gb", 80 * 10**9),
        ("4096", 4096),
        ("4096B", 4096),
        ("64k", 64_000),
        (2048, 2048),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "eighty", "-1GB", "0", "0GB", "12XB", "80 G B", "1e9", 0, -5, True])
def test_parse_bytes_rejects(text):
    with pytest.raises(SpecError) as err:
        parse_bytes(text)
    assert err.value.field == "--gpu-mem"


def test_format_bytes_reads_back():
    for n in (17_110_000_000, 512_000_000, 80 * 10**9):
        assert abs(parse_bytes(format_bytes(n).replace(" ", "")) - n) / n < 0.01


def test_load_plan_config_variants(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2_135M))
    from_folder = load_plan_config(str(folder))
    from_file = load_plan_config(str(folder / "config.json"))
    assert from_folder.num_hidden_layers == from_file.num_hidden_layers == 30

    with pytest.raises(ModelLoadError):
        load_plan_config(str(tmp_path / "missing" / "config.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        load_plan_config(str(empty))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="model_type"):
        load_plan_config(str(bad))

    import transformers

    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line of detail")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as err:
        load_plan_config("meta-llama/Llama-2-70b-hf")
    assert "\n" not in str(err.value) and "meta-llama/Llama-2-70b-hf" in str(err.value)


def test_render(configs):
    from rich.console import Console
    from rich.table import Table

    plan = plan_shards(configs["llama2-70b"], n_actors=8, mem_per_actor=parse_bytes("80GB"))
    table = render_plan(plan)
    assert isinstance(table, Table) and table.row_count == 8
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(table)
    text = console.export_text()
    assert "70-79" in text and "17.1 GB" in text
    lines = plan_lines(plan)
    assert len(lines) == 8 + 3 and "70-79" in lines[-2]
