"""The 2026 architectures (Llama 3, Gemma 2/3, Phi-3, OLMo 2, and the mixtures of experts Mixtral and
Qwen3-MoE) through `neuroal prune`: every method with uniform, OWL and NeuroAL reaches the target over
the prunable weights and reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY
from neuroal.families import family_for
from neuroal.prunable import block_linears
from orchestrator.pruning.job import prune
from orchestrator.spec import build_spec

NEW = ["llama3", "gemma2", "gemma3_text", "phi3", "phi3_mha", "olmo2", "mixtral", "qwen3_moe"]
METHODS = ["magnitude", "wanda", "sparsegpt", "multiflow", "apt"]


def _zeros(model) -> float:
    fam = family_for(model.config)
    zeros = total = 0
    for block in model.get_submodule(fam.blocks):
        for unit in block_linears(block, fam).values():  # linears and each expert's matrices
            w = unit.weight
            zeros, total = zeros + (w == 0).sum().item(), total + w.numel()
    return zeros / total


@pytest.mark.parametrize("top_up", ["uniform", "owl", "neuroal"])
@pytest.mark.parametrize("family", NEW)
def test_every_method_prunes_and_reloads(family, top_up, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    for method in METHODS:
        out = tmp_path / method
        spec = build_spec(model=str(tiny_dirs[family]), method=method, top_up=top_up, sparsity=0.6, seqlen=24,
                          nsamples=8, executor="local", data_dir=str(shared_data), out=str(out))
        run = prune(spec)
        assert run["sparsity_actual"] == pytest.approx(0.6, abs=0.04), method
        if top_up == "neuroal":
            assert run["lambda_block"] is not None
        model = AutoModelForCausalLM.from_pretrained(out)
        assert _zeros(model) == pytest.approx(run["sparsity_actual"], abs=1e-6)
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 1000, (1, 12))).logits).all()


@pytest.mark.parametrize("family", sorted(TINY))
def test_ria_and_d2prune_on_every_family(family, tiny_dirs, shared_data, tmp_path, monkeypatch):
    """The two newer methods on every family of the tiny matrix, with one top-up (their other top-ups and
    N:M run on Llama in pruning/test_job.py): the target is reached, the checkpoint reloads and runs."""
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    for method in ("ria", "d2prune"):
        out = tmp_path / method
        spec = build_spec(model=str(tiny_dirs[family]), method=method, top_up="uniform", sparsity=0.6, seqlen=24,
                          nsamples=4, executor="local", data_dir=str(shared_data), out=str(out))
        run = prune(spec)
        assert run["sparsity_actual"] == pytest.approx(0.6, abs=0.04), method
        model = AutoModelForCausalLM.from_pretrained(out)
        assert _zeros(model) == pytest.approx(run["sparsity_actual"], abs=1e-6)
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 1000, (1, 12))).logits).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_dsnot_and_alpha_and_the_fused_layout(family, tiny_dirs, shared_data, tmp_path, monkeypatch):
    """DSnoT (its MLP skip covers the experts) and AlphaPruning (α per expert matrix) run; the output keeps
    the fused [E, out, in] experts, the router stays dense."""
    from safetensors import safe_open

    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    for top_up in ("dsnot", "alpha"):
        out = tmp_path / top_up
        spec = build_spec(model=str(tiny_dirs[family]), method="wanda", top_up=top_up, sparsity=0.6, seqlen=24,
                          nsamples=8, executor="local", data_dir=str(shared_data), out=str(out))
        run = prune(spec)
        assert run["sparsity_actual"] == pytest.approx(0.6, abs=0.04), top_up
        assert "0.mlp.experts.down_proj[3]" in run["layer_sparsity"]
        keys = []
        for f in out.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                keys.extend(st.keys())
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any(".experts.0." in k for k in keys)
        model = AutoModelForCausalLM.from_pretrained(out)
        assert _zeros(model) == pytest.approx(run["sparsity_actual"], abs=1e-6)
        assert (model.model.layers[0].mlp.gate.weight != 0).all()


def test_moe_run_json_records_how_experts_were_calibrated(tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    for calibrate_all in (False, True):
        spec = build_spec(model=str(tiny_dirs["mixtral"]), method="wanda", top_up="neuroal", sparsity=0.5, seqlen=16,
                          nsamples=8, executor="local", data_dir=str(shared_data), out=str(tmp_path / str(calibrate_all)),
                          moe_calibrate_all_experts=calibrate_all)
        run = prune(spec)
        moe = run["moe_calibration"]
        assert moe["calibrate_all_experts"] is calibrate_all and set(moe["blocks"]) == {"0", "1", "2"}
        block = moe["blocks"]["0"]["mlp.experts"]
        assert sum(block["routed_tokens"]) == 8 * 16 * 2  # top-2 routing of every calibration token
        if calibrate_all:
            assert block["all_tokens"] == [0, 1, 2, 3]
        assert run["lambda_row"] is None and any("mixture of experts" in n for n in run["notes"])
