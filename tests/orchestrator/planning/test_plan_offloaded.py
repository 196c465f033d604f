"""Offloaded plans: a 70B model on one 80 GB GPU, device/host/disk needs by hand, the time projection."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig
from typer.testing import CliRunner

from neuroal.errors import SpecError
from orchestrator.cli import app
from orchestrator.planning import estimate_activation, measure_model
from orchestrator.planning.cost import ASSUMED_TFLOPS, block_forward_flops, projected_passes
from orchestrator.planning.memory import logits_bytes
from orchestrator.planning.offloaded import SEARCH_STREAMS, plan_offloaded
from tests.orchestrator.planning.test_plan import LLAMA2_70B

GB = 10**9


@pytest.fixture(scope="module")
def llama2_70b(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(LLAMA2_70B))
    return path


def tiny(**kw):
    args = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaConfig(**{**args, **kw})


def test_70b_on_one_80gb_gpu_is_an_offloaded_plan(llama2_70b, tmp_path):
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "--model", str(llama2_70b), "--gpus", "1", "--gpu-mem", "80GB",
                                   "--json", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "offloaded to host memory" in res.output and "do not fit" in res.output
    assert "projection, not a measurement" in res.output and "150 TFLOP/s (assumed)" in res.output
    plan = json.loads(out.read_text())
    assert plan["offload"] == "cpu" and plan["n_actors"] == 1
    (shard,) = plan["offloaded_shards"]
    assert shard["device_bytes"] <= plan["budget_bytes"]
    assert shard["host_bytes"] == sum(plan["block_param_bytes"]) and shard["disk_bytes"] == 0
    assert 130 * GB < shard["host_bytes"] < 140 * GB  # 80 blocks of 856M bf16 params
    names = [p["name"] for p in plan["projected_passes"]]
    assert names == ["search: block step", "search: tie check", "search: row step", "search: tie check", "final pass"]


def test_offload_none_refuses_and_disk_moves_the_blocks_to_disk(llama2_70b, tmp_path):
    res = CliRunner().invoke(app, ["plan", "--model", str(llama2_70b), "--gpus", "1", "--offload", "none"])
    assert res.exit_code == 2 and "--gpu-mem" in res.output
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "--model", str(llama2_70b), "--gpus", "2", "--offload", "disk",
                                   "--method", "sparsegpt", "--json", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    plan = json.loads(out.read_text())
    assert [p["name"] for p in plan["projected_passes"]][-1] == "final pass"
    assert "search: row step" not in [p["name"] for p in plan["projected_passes"]]  # SparseGPT: block step only
    for s, o in zip(plan["shards"], plan["offloaded_shards"]):
        assert o["disk_bytes"] == s["block_param_bytes"] and o["host_bytes"] < 2 * GB  # one block at a time


def test_too_small_even_offloaded_names_gpu_mem(llama2_70b):
    res = CliRunner().invoke(app, ["plan", "--model", str(llama2_70b), "--gpus", "1", "--gpu-mem", "8GB"])
    assert res.exit_code == 2 and "--gpu-mem" in res.output and "even offloaded" in res.output
    res = CliRunner().invoke(app, ["plan", "--model", str(llama2_70b), "--offload", "gpu"])
    assert res.exit_code == 2 and "--offload" in res.output and "auto, none, cpu, disk" in res.output


def test_device_need_by_hand():
    cfg = tiny()
    layout = measure_model(cfg)
    block = layout.blocks[0]
    p = plan_offloaded(cfg, n_actors=2, mem_per_actor=10**9, dtype="float32", seqlen=16, nsamples=32, method="wanda")
    first, last = p.plan.shards
    act = [estimate_activation(block, hidden_size=32, dtype_bytes=4, streams_in_flight=k, stream_windows=w, seqlen=16,
                               hessian=False, micro_tokens=10**9) for k, w in ((SEARCH_STREAMS, 8), (0, 32))]
    assert act[1].streams == 32 * 16 * 32 * 4 and act[0].streams == 16 * 8 * 16 * 32 * 4  # hand counts
    streams = max(16 * 8, 2 * 32) * 16 * 32 * 4  # 15 candidates + 1 output buffer vs the final pass in + out
    biggest = act[0].total - act[0].streams + streams
    embed, head = 99 * 32 * 4, (32 + 99 * 32) * 4
    assert p.shards[0].device_bytes == embed + block.params * 4 + biggest
    assert p.shards[1].device_bytes == head + block.params * 4 + biggest + logits_bytes(16, 99, 4)
    assert [s.host_bytes for s in p.shards] == [first.block_param_bytes, last.block_param_bytes]
    with pytest.raises(SpecError, match="--gpu-mem"):
        plan_offloaded(cfg, mem_per_actor=10**4, dtype="float32", seqlen=16)
    with pytest.raises(SpecError, match="--offload"):
        plan_offloaded(cfg, mem_per_actor=10**9, mode="gpu")


def test_projected_passes_by_hand():
    layout = measure_model(tiny())
    params = layout.blocks[0].params
    per_window = 4 * (2 * params * 16 + 4 * 16 * 16 * 32)  # 4 blocks, one forward
    assert block_forward_flops(params, 32, 16) * 4 == per_window
    passes = projected_passes(layout, dtype_bytes=2, seqlen=16, search_windows=8, nsamples=128, mode="cpu",
                              h2d_gbps=1.0)
    assert [p.windows for p in passes] == [14 * 8, 2 * 8, 15 * 8, 2 * 8, 128]
    high = projected_passes(layout, dtype_bytes=2, seqlen=16, search_windows=8, nsamples=128, mode="cpu",
                            sparsity=0.8)  # λ = 0.25 leaves the block set at s >= 0.8, as in the run
    assert [p.windows for p in high] == [13 * 8, 2 * 8, 15 * 8, 2 * 8, 128]
    final = passes[-1]
    assert final.compute_s == pytest.approx(2 * 128 * per_window / (ASSUMED_TFLOPS * 1e12))
    assert final.move_s == pytest.approx(4 * params * 2 / 1e9)
    disk = projected_passes(layout, dtype_bytes=2, seqlen=16, search_windows=8, nsamples=128, mode="disk",
                            h2d_gbps=25.0, disk_gbps=0.5, row_step=False)
    assert len(disk) == 3 and disk[-1].move_s == pytest.approx(4 * params * 2 / 0.5e9)


def test_projection_runs_the_steps_the_run_runs(tmp_path):
    """The projected passes follow `neuroal.allocation.neuroal.steps`: a mixture of experts has no row step."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "--model", str(path), "--offload", "cpu", "--seqlen", "16",
                                   "--json", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    names = [p["name"] for p in json.loads(out.read_text())["projected_passes"]]
    assert names == ["search: block step", "search: tie check", "final pass"]
