"""End to end on tiny models: every family prunes to the target and still runs; checkpoints reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from neuroal.families import family_for
from orchestrator.pruning.job import prune
from orchestrator.spec import build_spec
from orchestrator.results.store import read_store

FAMILIES = ["llama", "llama_gqa", "mistral", "qwen2", "qwen3", "opt", "phi", "gpt_neox", "mamba", "mamba2",
            "llama3", "gemma2", "gemma3_text", "phi3", "phi3_mha", "olmo2"]


def _spec(tmp_path, model, shared_data, **kw):
    base = dict(model=str(model), seqlen=32, nsamples=4, executor="local", data_dir=str(shared_data),
                eval="wikitext2", eval_windows=2, out=str(tmp_path / "run"))
    base.update(kw)
    return build_spec(**base)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_to_target_and_reloads(family, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    spec = _spec(tmp_path, tiny_dirs[family], shared_data, method="wanda", sparsity=0.5)
    run = prune(spec)
    assert run["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
    out = tmp_path / "run"
    assert json.loads((out / "run.json").read_text())["cell_key"] == spec.cell_key()
    model = AutoModelForCausalLM.from_pretrained(out)
    fam = family_for(model.config)
    zeros = total = 0
    for block in model.get_submodule(fam.blocks):
        for name in fam.linears:
            w = block.get_submodule(name).weight
            zeros += (w == 0).sum().item()
            total += w.numel()
    assert zeros / total == pytest.approx(run["sparsity_actual"], abs=1e-6)
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (1, 16))).logits
    assert torch.isfinite(logits).all()
    rows = read_store(tmp_path / "store").table.to_pylist()
    assert {(r["task"], r["metric"]) for r in rows} == {("prune", "sparsity_actual"), ("wikitext2", "perplexity")}


def test_reload_gives_the_same_perplexity(tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    run = prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, method="sparsegpt", sparsity=0.6))
    again = prune(_spec(tmp_path / "re", tmp_path / "run", shared_data, method="magnitude", sparsity=0.01,
                            eval="wikitext2"))
    # the reloaded checkpoint pruned again at 1% by magnitude only removes already-zero weights
    assert again["perplexity"]["wikitext2"] == pytest.approx(run["perplexity"]["wikitext2"], rel=1e-5)


def test_rerun_resumes_and_store_has_no_duplicates(tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    spec = _spec(tmp_path, tiny_dirs["llama"], shared_data)
    first = prune(spec)
    mtime = (tmp_path / "run" / "run.json").stat().st_mtime
    second = prune(spec)
    assert second == first and (tmp_path / "run" / "run.json").stat().st_mtime == mtime
    assert read_store(tmp_path / "store").table.num_rows == 2
    with pytest.raises(Exception, match="holds another run"):
        prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, sparsity=0.6))


@pytest.mark.parametrize("top_up", ["uniform", "owl", "alpha", "dsnot", "neuroal"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "multiflow", "apt", "ria", "d2prune"])
def test_every_top_up_with_every_method(top_up, method, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    spec = _spec(tmp_path, tiny_dirs["llama_gqa"], shared_data, method=method, top_up=top_up, sparsity=0.6,
                 nsamples=8, eval="")
    run = prune(spec)
    assert run["sparsity_actual"] == pytest.approx(0.6, abs=0.04)
    if top_up == "neuroal":
        assert run["lambda_block"] is not None
        if method in ("sparsegpt", "apt", "d2prune"):  # solvers
            assert run["lambda_row"] is None and any("block step only" in n for n in run["notes"])
        else:
            assert run["lambda_row"] is not None
            assert any("self_attn.k_proj keeps its block ratio" in n for n in run["notes"])  # GQA rule


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("top_up", ["uniform", "dsnot"])
def test_nm_patterns(pattern, top_up, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    spec = _spec(tmp_path, tiny_dirs["llama"], shared_data, method="wanda", top_up=top_up, pattern=pattern, eval="")
    run = prune(spec)
    assert run["sparsity_actual"] == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("top_up", ["uniform", "dsnot"])
@pytest.mark.parametrize("method", ["ria", "d2prune"])
def test_nm_patterns_of_ria_and_d2prune(method, top_up, pattern, tiny_dirs, shared_data, tmp_path, monkeypatch):
    """Every row group of M inputs in every prunable linear holds exactly N zeros (D²Prune: its
    swept linears and its v_proj, masked without update, alike)."""
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    spec = _spec(tmp_path, tiny_dirs["llama"], shared_data, method=method, top_up=top_up, pattern=pattern, eval="")
    run = prune(spec)
    assert run["sparsity_actual"] == pytest.approx(0.5, abs=1e-9)
    n, m = (int(v) for v in pattern.split(":"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    fam = family_for(model.config)
    for block in model.get_submodule(fam.blocks):
        for name in fam.linears:
            w = block.get_submodule(name).weight
            assert ((w == 0).reshape(w.shape[0], -1, m).sum(-1) == n).all(), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "apt"])
def test_mamba_runs_every_solver_and_the_neuroal_block_step(method, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    spec = _spec(tmp_path, tiny_dirs["mamba"], shared_data, method=method, top_up="neuroal", sparsity=0.6, eval="",
                 nsamples=8)
    run = prune(spec)
    assert run["sparsity_actual"] == pytest.approx(0.6, abs=0.03)
    assert run["lambda_block"] is not None and run["lambda_row"] is None
    assert any("block step only" in n for n in run["notes"])


def test_prune_with_zeroshot_writes_rows(tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    spec = _spec(tmp_path, tiny_dirs["llama"], shared_data, zeroshot="arc_easy", zeroshot_limit=4, eval="")
    run = prune(spec)
    assert {(r["task"], r["metric"]) for r in run["zeroshot"]} == {("arc_easy", "acc"), ("arc_easy", "acc_norm")}
    rows = read_store(tmp_path / "store").table.to_pylist()
    assert {(r["task"], r["metric"]) for r in rows} >= {("arc_easy", "acc"), ("arc_easy", "acc_norm")}
