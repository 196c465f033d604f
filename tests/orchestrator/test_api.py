"""The Python API (`from orchestrator import prune, evaluate, plan`) and the typed run record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_python_block() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.ray
def test_the_readme_python_example_runs_as_written(smollm2_dir, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its out= is relative
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("NEUROAL_DATA_DIR", str(shared_data))
    scope: dict = {}
    exec(compile(_readme_python_block(), "README.md", "exec"), scope)
    run, again, model = scope["run"], scope["again"], scope["model"]
    saved = json.loads((tmp_path / "runs" / "api-demo" / "run.json").read_text())
    # the record is what run.json was written from
    assert (run.lambda_block, run.lambda_row) == (saved["lambda_block"], saved["lambda_row"])
    assert run.lambda_block is not None and run.lambda_row is not None
    assert run.sparsity_actual == saved["sparsity_actual"] and abs(run.sparsity_actual - 0.7) < 0.01
    assert run.perplexity == saved["perplexity"] and run.evaluation("wikitext2").windows == 4
    assert run.to_json()["lambda_curves"] == saved["lambda_curves"] and run["cell_key"] == saved["cell_key"]
    # evaluate() added a quick look beside the full one; the headline stays the fuller
    assert sorted(e.windows for e in again.evaluations) == [2, 4]
    assert again.perplexity == run.perplexity
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n.endswith("down_proj"))
    assert zeros > 0
    out = capsys.readouterr().out
    assert "seqlen 32, 4 of" in out and "'first_block': 0" in out
    # the NeuroAL search on the real model (this block's prune; it was a test of its own)
    assert run.lambda_block in [p["lambda"] for p in run.lambda_curves["block"]]
    # SmolLM2 uses grouped-query attention: q, k, v keep their block ratio in the row step
    assert any("self_attn.k_proj keeps its block ratio" in n for n in run.notes)
    planned = run["block_sparsity_planned"]
    assert planned[0] < 0.7 < planned[-1]  # sparsity rises with depth


def test_api_errors_are_the_clis_one_line_errors(tmp_path):
    from neuroal.errors import SpecError
    from orchestrator import evaluate, plan, prune

    with pytest.raises(SpecError, match=r"^--sparsity: got 1.5; allowed: a fraction strictly between 0 and 1$"):
        prune(sparsity=1.5, out=str(tmp_path / "run"))
    with pytest.raises(SpecError, match=r"^--top-up: got 'owl2'"):
        prune(top_up="owl2", out=str(tmp_path / "run"))
    with pytest.raises(SpecError, match=r"^--eval-windows: got 0"):
        evaluate(str(tmp_path), eval="wikitext2", eval_windows=0)
    with pytest.raises(SpecError, match=r"^--gpus: got 0"):
        plan(gpus=0)
    assert not (tmp_path / "run").exists()


def test_the_record_reads_a_run_json_written_before_evaluations_existed():
    from orchestrator.results.record import RunRecord

    old = {"spec": {"model": "m", "method": "wanda", "top_up": "owl", "pattern": "unstructured", "seed": 0,
                    "calibration": "c4", "seqlen": 128},
           "cell_key": "k", "sparsity_target": 0.5, "sparsity_actual": 0.5004, "lambda_block": None,
           "perplexity": {"wikitext2": 12.5},
           "eval_data": {"wikitext2": {"origin": "o", "windows": 8, "windows_available": 10, "tokens": 1,
                                       "seqlen": 128, "eval_key": "e"}},
           "zeroshot": [{"task": "arc_easy", "metric": "acc", "value": 0.5, "stderr": 0.05, "n_docs": 100,
                         "eval_key": "z"}]}
    rec = RunRecord.from_json(old)
    assert rec.top_up == "owl" and rec.lambda_block is None and rec.out is None
    ppl = rec.evaluation("wikitext2")
    assert (ppl.value, ppl.protocol, ppl.eval_key) == (12.5, "seqlen 128, 8 of 10 windows", "e")
    assert rec.evaluation("arc_easy", "acc").protocol == "100 documents"  # the limit was not recorded then
    assert rec.to_json()["eval_data"] == old["eval_data"] and dict(rec)["zeroshot"] == old["zeroshot"]
    with pytest.raises(KeyError, match="no perplexity of 'c4' on record"):
        rec.evaluation("c4")
