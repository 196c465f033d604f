"""Results a user can trust: honest artefacts, disjoint offline splits, up-front refusals (issue 12)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from neuroal.data import in_validation, load_documents
from orchestrator.cli import app
from orchestrator.pruning.job import prune
from orchestrator.spec import build_spec


def _spec(tmp_path, model, shared_data, **kw):
    base = dict(model=str(model), seqlen=32, nsamples=4, executor="local", data_dir=str(shared_data),
                out=str(tmp_path / "run"))
    base.update(kw)
    return build_spec(**base)


def test_config_json_says_the_stored_dtype(tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, dtype="bfloat16"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert model.dtype == torch.bfloat16


def test_offline_c4_calibration_and_evaluation_are_disjoint(shared_data):
    train = load_documents("c4", "train", shared_data)
    val = load_documents("c4", "validation", shared_data)
    assert train.docs and val.docs and not set(train.docs) & set(val.docs)
    assert all(in_validation(d) for d in val.docs) and not any(in_validation(d) for d in train.docs)
    assert "split by SHA-256" in train.origin and "indices" in val.origin


def test_c4_perplexity_never_reads_calibration_text(tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    run = prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, eval="c4", eval_windows=2))
    assert "validation:" in run["eval_data"]["c4"]["origin"] and "train:" in run["calibration"]["origin"]


@pytest.mark.parametrize("nsamples,seqlen,why", [
    (100000, 2048, "the final pass holds 2 x nsamples x seqlen x hidden"),  # 52 GB of hidden states
    (5000, 256, "non-overlapping windows of 256 tokens"),  # fits memory, but the local C4 holds ~500
])
def test_an_oversized_request_exits_2_with_nothing_written(nsamples, seqlen, why, tiny_dirs, tmp_path, shared_data):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["prune", "--model", str(tiny_dirs["llama"]), "--executor", "local",
                                      "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--data-dir",
                                      str(shared_data), "--out", str(out)])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"--nsamples: got {nsamples}; allowed: at most" in lines[0] and why in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_block_sparsity_plot_draws_the_chosen_allocation_and_uniform(tiny_dirs, shared_data, tmp_path, monkeypatch):
    import matplotlib

    from orchestrator.results import plots

    seen = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: (seen.append((str(path), [t.get_text() for ax in fig.axes
                                                 for t in ax.get_legend().get_texts()])), real_savefig(fig, path, **kw)))
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    run = prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, top_up="owl"))
    legend = dict(seen)[str(next(p for p, _ in seen if p.endswith("block_sparsity.png")))]
    assert legend == ["owl (chosen)", "uniform"]
    assert plots.block_sparsity(run, tmp_path / "again.png").exists()


def test_a_rerun_with_a_new_eval_computes_only_the_new_metric(tiny_dirs, shared_data, tmp_path, monkeypatch):
    from orchestrator.evaluation import perplexity as evaluation
    from orchestrator.results.store import read_store

    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    first = prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, eval="wikitext2", eval_windows=2))
    computed = []
    real = evaluation.perplexity
    monkeypatch.setattr(evaluation, "perplexity", lambda s, name, *a, **k: (computed.append(name), real(s, name, *a, **k))[1])
    second = prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, eval="c4", eval_windows=2))
    assert computed == ["c4"]  # the checkpoint was kept, only the missing metric computed
    assert second["perplexity"]["wikitext2"] == first["perplexity"]["wikitext2"] and "c4" in second["perplexity"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["perplexity"] == second["perplexity"]
    rows = read_store(tmp_path / "store").table.to_pylist()
    assert sorted(r["task"] for r in rows if r["metric"] == "perplexity") == ["c4", "wikitext2"]
    # a different number of windows is another evaluation, not the one on record
    computed.clear()
    prune(_spec(tmp_path, tiny_dirs["llama"], shared_data, eval="c4", eval_windows=3))
    assert computed == ["c4"]


def test_neuroal_eval_on_a_run_folder_and_on_a_plain_checkpoint(tiny_dirs, shared_data, tmp_path, monkeypatch):
    from orchestrator.results.store import read_store

    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    run = prune(_spec(tmp_path, tiny_dirs["llama"], shared_data))
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "run"), "--eval", "wikitext2", "--eval-windows", "2",
                                 "--executor", "local", "--data-dir", str(shared_data)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "wikitext2" in saved["perplexity"] and saved["cell_key"] == run["cell_key"]
    result = runner.invoke(app, ["eval", "--model", str(tiny_dirs["llama"]), "--eval", "wikitext2", "--eval-windows",
                                 "2", "--seqlen", "32", "--executor", "local", "--data-dir", str(shared_data)])
    assert result.exit_code == 0, result.output
    rows = read_store(tmp_path / "store").table.to_pylist()
    dense = [r for r in rows if r["method"] == "dense"]
    assert [r["task"] for r in dense] == ["wikitext2"] and dense[0]["cell_key"] != run["cell_key"]
    assert {r["eval_key"] for r in rows if r["task"] == "wikitext2"} != {""}


def test_run_json_records_each_steps_lead_and_noise(tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    run = prune(_spec(tmp_path, tiny_dirs["llama_gqa"], shared_data, top_up="neuroal", sparsity=0.6, nsamples=8))
    checks = run["allocation_extra"]["tie_check"]
    assert set(checks) == {"block", "row"}
    for step, c in checks.items():
        assert c["best"] == run[f"lambda_{step}"] and c["runner_up"] is not None and c["margin"] >= 0
        assert c["noise"] is not None and c["noise"] >= 0
        assert c["near_tie"] == (c["margin"] <= c["noise"])
        assert any("coin flip" in n for n in run["notes"]) == any(x["near_tie"] for x in checks.values())
