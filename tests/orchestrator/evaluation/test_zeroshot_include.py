"""`neuroal eval --zeroshot` as lm-eval users know it (issue 24): their own task YAMLs (`--zeroshot-include`),
`--num-fewshot`, groups, generation tasks; every metric equal to stock lm-eval on the same checkpoint and
documents; an unknown name or a stock task out of reach is one line, exit 2, nothing written. Evaluation keys
cover shots and task definitions; grids and the report take tasks with no `acc`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_checkpoint
from neuroal.data import DATA_VERSION
from orchestrator.evaluation import zeroshot as evaluation
from orchestrator.results import evaluations as records
from orchestrator.cli import app
from orchestrator.spec import eval_key
from orchestrator.results.store import append_rows, existing_keys, read_store

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama", tokenizer=smollm2_tokenizer)


@pytest.fixture
def offline(monkeypatch):
    """No hub; and no model-loading bar (the CLI turns it off before transformers is imported; here it is
    imported already)."""
    from transformers.utils import logging as hf_logging

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if bars:
        hf_logging.enable_progress_bar()


def _stock(checkpoint: Path, include: Path, tasks: list[str], num_fewshot: int = 0, limit: int | None = None) -> dict:
    """Stock lm-eval as `lm_eval --model hf --model_args pretrained=CKPT --include_path DIR --num_fewshot N`
    runs it (HFLM from the path, batch size 1): {(task, metric with a non-"none" filter): (value, stderr)}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # include_defaults=False: the same tasks as with the stock index, without its ~10 s build
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=str(checkpoint), device="cpu"), tasks=tasks,
                                  num_fewshot=num_fewshot, limit=limit, log_samples=False,
                                  task_manager=TaskManager(include_path=str(include), include_defaults=False))
    got = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if comma and not metric.endswith("_stderr"):
                got[(task, metric if filt == "none" else key)] = (float(value),
                                                                  float(metrics[f"{metric}_stderr,{filt}"]))
    return got


def _eval(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["eval", "--executor", "local", *args])
    return result.exit_code, [line for line in result.output.strip().splitlines() if line.strip()]


def _rows(store: Path, protocol_has: str = "") -> dict:
    return {(r["task"], r["metric"]): (r["value"], r["stderr"]) for r in read_store(store).table.to_pylist()
            if protocol_has in r["protocol"]}


# ----------------------------------------------------------------------------- equal to stock lm-eval


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_eval_runs_the_users_tasks_offline_equal_to_stock_lm_eval(model, tiny, smollm2_dir, user_tasks, tmp_path,
                                                                 offline):
    """A multiple-choice task and a generation task from --zeroshot-include, over local jsonl files: every
    metric (lm-eval's names, filters included) equals stock lm-eval's. The tiny model's generations are
    noise, but the `answer_chars,whole` metric moves with every generated character; SmolLM2 gets sums right."""
    checkpoint = tiny if model == "tiny" else smollm2_dir
    store = tmp_path / "store"
    code, lines = _eval("--model", str(checkpoint), "--zeroshot", "colours_mc,sums_gen", "--zeroshot-include",
                        str(user_tasks), "--store", str(store))
    assert code == 0, lines
    ours = _rows(store)
    assert {m for _, m in ours} == {"acc", "acc_norm", "exact_match,strict-match", "exact_match,flexible-extract",
                                    "exact_match,whole", "answer_chars,strict-match",
                                    "answer_chars,flexible-extract", "answer_chars,whole"}
    assert ours == _stock(checkpoint, user_tasks, ["colours_mc", "sums_gen"], 0)  # exactly
    assert ours[("sums_gen", "answer_chars,whole")][0] > 0
    if model == "smollm2":
        print({k: v[0] for k, v in ours.items()})
        assert ours[("sums_gen", "exact_match,flexible-extract")][0] > 0  # it can add


def test_num_fewshot_2_equals_stock_lm_eval_and_is_its_own_evaluation(tiny, user_tasks, tmp_path, offline):
    store = tmp_path / "store"
    for shots in ("0", "2"):
        code, lines = _eval("--model", str(tiny), "--zeroshot", "colours_mc", "--zeroshot-include", str(user_tasks),
                            "--num-fewshot", shots, "--store", str(store))
        assert code == 0, lines
    assert _rows(store, "2-shot") == _stock(tiny, user_tasks, ["colours_mc"], 2)
    rows = read_store(store).table.to_pylist()
    keys = {r["protocol"]: r["eval_key"] for r in rows}
    assert set(keys) == {"20 documents (all), float32", "20 documents (all), 2-shot, float32"} and len(set(keys.values())) == 2


def test_a_group_reports_its_aggregate_and_its_subtasks_as_stock(tiny, user_tasks, tmp_path, offline):
    store = tmp_path / "store"
    code, lines = _eval("--model", str(tiny), "--zeroshot", "colours_and_sums", "--zeroshot-include",
                        str(user_tasks), "--zeroshot-limit", "8", "--store", str(store))
    assert code == 0, lines
    ours = _rows(store)
    assert ("colours_and_sums", "acc") in ours and ("colours_mc", "acc_norm") in ours
    assert ours == _stock(tiny, user_tasks, ["colours_and_sums"], limit=8)
    assert {r["eval_key"] for r in read_store(store).table.to_pylist()} == {  # one key: the request
        records.zeroshot_key("colours_and_sums", 8, include=evaluation.task_folder(str(user_tasks)),
                                dtype="float32")}


# ----------------------------------------------------------------------------- one line, exit 2, nothing written


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--executor", "local", "--model", "{tiny}", "--zeroshot", "colours_mcq", "--zeroshot-include",
      "{tasks}"], "--zeroshot: got 'colours_mcq'; allowed: a task, group or tag of lm-eval"),
    (["prune", "--check", "--zeroshot", "arc_eazy"], "did you mean 'arc_easy'"),
    (["eval", "--executor", "local", "--model", "{tiny}", "--zeroshot", "piqa"],
     "task 'piqa' is not available offline"),
    (["eval", "--executor", "local", "--model", "{tiny}", "--zeroshot", "colours_mc", "--zeroshot-include",
      "{tasks}/nope"], "--zeroshot-include: got"),
    (["eval", "--executor", "local", "--model", "{tiny}", "--zeroshot", "colours_mc", "--zeroshot-include",
      "{tasks}", "--num-fewshot", "-1"], "--num-fewshot: got -1; allowed: a non-negative integer"),
])
def test_a_bad_task_is_one_line_exit_2_nothing_written(argv, needle, tiny, user_tasks, tmp_path, offline,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    before = _tree(tmp_path)
    t = time.perf_counter()
    result = CliRunner().invoke(app, [a.format(tiny=tiny, tasks=user_tasks) for a in argv])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert _tree(tmp_path) == before
    assert time.perf_counter() - t < 60


def test_a_stock_task_out_of_reach_says_how_to_get_it(tiny, tmp_path, offline):
    code, lines = _eval("--model", str(tiny), "--zeroshot", "piqa", "--store", str(tmp_path / "store"))
    assert code == 2 and len(lines) == 1
    assert "Hugging Face hub" in lines[0] and "--zeroshot-include DIR" in lines[0] and "baber/piqa" in lines[0]
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- evaluation keys


def test_default_zeroshot_keys_are_unchanged_and_shots_and_definitions_join_them(user_tasks):
    old = hashlib.sha256(json.dumps({"kind": "zeroshot", "name": "arc_easy", "seqlen": None, "windows": None,
                                     "limit": 100, "data_version": DATA_VERSION}, sort_keys=True).encode())
    assert eval_key("zeroshot", "arc_easy", limit=100) == old.hexdigest()[:16]  # stores keep their keys
    folder = evaluation.task_folder(str(user_tasks))
    row = {"task": "arc_easy", "metric": "acc", "value": 0.5, "stderr": 0.1, "n_docs": 100}
    assert records.keyed_zeroshot([row], 100, include=folder)[0]["eval_key"] == old.hexdigest()[:16]
    assert records.zeroshot_key("arc_easy", 100, num_fewshot=2) != old.hexdigest()[:16]
    own = records.zeroshot_key("colours_mc", None, include=folder)
    assert own != eval_key("zeroshot", "colours_mc")  # the definitions it came from are part of it


def test_missing_asks_again_only_for_what_was_made_differently(user_tasks):
    folder = evaluation.task_folder(str(user_tasks))
    rows = [{"task": "colours_mc", "metric": "acc", "value": 0.5, "stderr": 0.1, "n_docs": 20,
             "request": "colours_and_sums"}]
    keyed = records.keyed_zeroshot(rows, None, include=folder)
    run = {"evaluations": records.zeroshot_entries(keyed, None)}
    kw = dict(perplexity_sets=(), seqlen=32, windows=None, limit=None, include=folder)
    assert records.missing(run, zeroshot_tasks=["colours_and_sums"], **kw) == ([], [])  # found by its key
    assert records.missing(run, zeroshot_tasks=["colours_and_sums"], num_fewshot=1, **kw) == ([], ["colours_and_sums"])
    edited = dataclasses.replace(folder, digest="0" * 16)
    assert records.missing(run, zeroshot_tasks=["colours_and_sums"], **dict(kw, include=edited))[1] == ["colours_and_sums"]


def test_the_users_definitions_travel_to_a_process_that_cannot_read_them(user_tasks):
    folder = evaluation.task_folder(str(user_tasks))
    with evaluation.task_folder_here(folder) as here:
        assert here == str(user_tasks)  # the driver's machine: the folder itself (hooks beside their data)
    elsewhere = dataclasses.replace(folder, path="/nonexistent/tasks")
    with evaluation.task_folder_here(elsewhere) as here:
        assert here != elsewhere.path and evaluation.task_folder(here).digest == folder.digest
    assert not Path(here).exists()


# ----------------------------------------------------------------------------- grids and the report


def test_a_grid_takes_the_users_tasks_and_knows_when_tasks_without_acc_are_done(user_tasks, tmp_path):
    import yaml

    from orchestrator.grid import cell_done, evaluations_left, expand, load_grid

    (tmp_path / "grids").mkdir()
    spec = tmp_path / "grids" / "g.yaml"
    relative = os.path.relpath(user_tasks, spec.parent)  # a grid names its folder relative to itself
    spec.write_text(yaml.safe_dump({"models": ["smollm2-135m"], "tasks": {"perplexity": [], "zeroshot": [
        "sums_gen", "arc_easy"]}, "zeroshot_include": relative}))
    assert load_grid(spec).zeroshot_include == str(user_tasks.resolve())
    (cell,) = expand(load_grid(spec), tmp_path / "store").cells
    assert evaluations_left(cell, set()) == [("zeroshot", "sums_gen"), ("zeroshot", "arc_easy")]
    pruned = {(cell.key, "", "prune", "sparsity_actual")}
    gen = {(cell.key, cell.zeroshot_keys["sums_gen"], "sums_gen", "exact_match,strict-match")}
    legacy_arc = {(cell.key, "", "arc_easy", "acc")}  # an older grid's row, written without its key
    assert not cell_done(cell, pruned | gen)
    assert cell_done(cell, pruned | gen | legacy_arc)  # sums_gen has no `acc`: its key is what counts
    shots = load_grid(spec).model_copy(update={"num_fewshot": 2})
    (cell2,) = expand(shots, tmp_path / "store").cells
    assert evaluations_left(cell2, pruned | gen | legacy_arc) == cell2.evals  # 2-shot: another evaluation


def test_the_report_shows_tasks_without_acc_under_lm_evals_metric_names(tmp_path):
    from orchestrator.results.report import build_report

    base = {"run_id": "r", "cell_key": "k", "eval_key": "e", "model": "m", "method": "wanda", "top_up": "uniform",
            "sparsity": 0.5, "pattern": "unstructured", "seed": 0, "calibration": "c4", "seqlen": 32,
            "protocol": "10 documents (all)"}
    append_rows(tmp_path / "store", [
        dict(base, task="colours_mc", metric="acc", value=0.4, stderr=0.1),
        dict(base, task="sums_gen", metric="exact_match,strict-match", value=0.3, stderr=0.1),
        dict(base, task="sums_gen", metric="exact_match,flexible-extract", value=0.5, stderr=0.1)])
    assert len(existing_keys(tmp_path / "store")) == 3
    build_report(tmp_path / "store", tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Zero-shot accuracy (acc" in md and "Other zero-shot metrics" in md
    assert "exact_match,strict-match" in md and "exact_match,flexible-extract" in md


# ----------------------------------------------------------------------------- a prune's and a grid cell's zero-shot


def test_a_prune_evaluates_the_users_task_once_per_way_of_asking(tiny, user_tasks, shared_data, tmp_path, monkeypatch,
                                                                offline):
    from orchestrator.pruning.job import prune
    from orchestrator.spec import build_spec

    def spec(**kw):
        return build_spec(model=str(tiny), method="wanda", sparsity=0.5, seqlen=32, nsamples=4, executor="local",
                          data_dir=str(shared_data), out=str(tmp_path / "run"), zeroshot="colours_mc,sums_gen",
                          zeroshot_include=str(user_tasks), zeroshot_limit=4, **kw)

    first = prune(spec(), store=tmp_path / "store")
    assert {(r["task"], r["metric"]) for r in first["zeroshot"]} >= {("colours_mc", "acc"),
                                                                      ("sums_gen", "exact_match,strict-match")}
    asked = []
    real = evaluation.zeroshot
    monkeypatch.setattr(evaluation, "zeroshot", lambda *a, **k: (asked.append(list(a[1])), real(*a, **k))[1])
    prune(spec(), store=tmp_path / "store")
    assert asked == []  # the same tasks, shots and definitions: on record already
    again = prune(spec(num_fewshot=1), store=tmp_path / "store")
    assert asked == [["colours_mc", "sums_gen"]]
    shots = {e["num_fewshot"] for e in again["evaluations"] if e["kind"] == "zeroshot"}
    assert shots == {0, 1}


def test_a_grid_cell_evaluates_the_users_task_with_its_key(tiny, user_tasks, offline):
    from orchestrator.grid import eval_cell

    folder = evaluation.task_folder(str(user_tasks))
    rows = eval_cell(str(tiny), "zeroshot", "sums_gen", 32, None, None, 4, 1, folder)
    assert {r["eval_key"] for r in rows} == {records.zeroshot_key("sums_gen", 4, num_fewshot=1, include=folder,
                                                                     dtype="float32")}
    assert {r["metric"] for r in rows} >= {"exact_match,strict-match", "exact_match,flexible-extract"}


def test_the_python_api_takes_the_same_options(tiny, user_tasks, offline):
    from orchestrator import evaluate

    record = evaluate(str(tiny), zeroshot="colours_and_sums", zeroshot_include=str(user_tasks), num_fewshot=1,
                      zeroshot_limit=4, executor="local", store=False)
    rows = {(e.task, e.metric): e for e in record.evaluations}
    assert rows[("colours_and_sums", "acc")].num_fewshot == 1 and rows[("colours_mc", "acc")].request == "colours_and_sums"
    assert rows[("sums_gen", "exact_match,flexible-extract")].protocol == "4 documents (--zeroshot-limit 4), 1-shot, float32"
