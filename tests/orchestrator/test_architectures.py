"""The 2026 architectures (Llama 3, Gemma 2/3, Phi-3, OLMo 2) through `neuroal prune`: every method
with uniform, OWL and NeuroAL reaches the target over the prunable weights and reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from neuroal.families import family_for
from orchestrator.run import prune
from orchestrator.spec import build_spec

NEW = ["llama3", "gemma2", "gemma3_text", "phi3", "phi3_mha", "olmo2"]
METHODS = ["magnitude", "wanda", "sparsegpt", "multiflow", "apt"]


def _zeros(model) -> float:
    fam = family_for(model.config)
    zeros = total = 0
    for block in model.get_submodule(fam.blocks):
        for name in fam.linears:
            w = block.get_submodule(name).weight
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
