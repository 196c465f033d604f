"""Grids: validation, a 2x2x2 grid end to end on local Ray, resume after a kill, corrupt store files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from neuroal.errors import SpecError
from orchestrator.grid import expand, expected_rows, load_grid, run_grid
from orchestrator.results.report import build_report
from orchestrator.results.store import append_rows, read_store


def _write(tmp_path, body: dict, name="g.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body))
    return p


def _tiny_grid(tmp_path, tiny_dirs, **extra) -> Path:
    body = {
        "name": "tiny",
        "models": [str(tiny_dirs["llama"]), str(tiny_dirs["opt"])],
        "methods": ["magnitude", "wanda"],
        "top_ups": ["uniform"],
        "sparsities": [0.5, 0.7],
        "nsamples": 4,
        "seqlen": 32,
        "eval_windows": 2,
        "tasks": {"perplexity": ["wikitext2"], "zeroshot": ["arc_easy"]},
        "zeroshot_limit": 4,
    }
    body.update(extra)
    return _write(tmp_path, body)


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"models": ["m"], "colour": 1}, "grid key 'colour': got 'unknown'"),
        ({"methods": ["wanda"]}, "grid key 'models': got 'missing'"),
        ({"models": ["m"], "methods": ["obs"]}, "--method: got 'obs'"),
        ({"models": ["m"], "top_ups": ["owlx"]}, "--top-up: got 'owlx'"),
        ({"models": ["m"], "sparsities": [1.2]}, "sparsities: got 1.2"),
        ({"models": ["m"], "patterns": ["3:3"]}, "--pattern: got '3:3'"),
        ({"models": ["m"], "tasks": {"zeroshot": ["mmlux"]}}, "tasks.zeroshot: got 'mmlux'"),
        ({"models": ["m"], "tasks": {"zeroshot": ["arc_easy"]}, "num_fewshot": -1}, "num_fewshot: got -1"),
        ({"models": ["m"], "zeroshot_include": "nope/"}, "zeroshot_include: got"),
        ({"models": ["m"], "tasks": {"ppl": ["c4"]}}, "grid key 'tasks.ppl'"),
        ({"models": ["m"], "prune": {"sparsity": 0.3}}, "prune.sparsity"),
        ({"models": ["m"], "prune": {"colour": 1}}, "prune: got 'colour'"),
    ],
)
def test_bad_grid_specs(tmp_path, body, needle):
    with pytest.raises(SpecError) as exc:
        load_grid(_write(tmp_path, body))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_include_and_skipped_combinations(tmp_path):
    _write(tmp_path, {"models": ["smollm2-135m"], "nsamples": 16}, "base.yaml")
    g = load_grid(_write(tmp_path, {"include": "base.yaml", "top_ups": ["uniform", "owl"], "patterns": ["2:4"],
                                    "sparsities": [0.5, 0.7]}))
    assert g.nsamples == 16
    plan = expand(g, tmp_path)
    assert len(plan.cells) == 1  # 2:4 fixes the sparsity; OWL cannot vary it
    assert plan.cells[0].spec.sparsity == 0.5 and plan.skipped and "--top-up" in plan.skipped[0][1]


def test_shipped_grids_validate(tmp_path):
    root = Path(__file__).resolve().parents[2] / "grids"
    for name in ("smoke.yaml", "paper.yaml"):
        g = load_grid(root / name)
        assert expand(g, tmp_path).cells


@pytest.mark.ray
def test_tiny_grid_end_to_end_then_resume_after_kill(tmp_path, tiny_dirs, shared_data):
    spec = _tiny_grid(tmp_path, tiny_dirs)
    store = tmp_path / "store"
    g = load_grid(spec)
    cells = expand(g, store).cells
    assert len(cells) == 8
    expected = set().union(*(expected_rows(c) for c in cells))
    # 1) start the grid as a user would, kill it once some rows landed
    env = dict(os.environ, NEUROAL_DATA_DIR=str(shared_data))
    cmd = [sys.executable, "-m", "orchestrator", "grid", str(spec), "--store", str(store), "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and read_store(store).table.num_rows < 4:
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_store(store).table.num_rows
    assert 0 < partial < len(expected) + 8
    # 2) rerun in-process: completes, no duplicates, nothing lost
    states = run_grid(g, store, data_dir=str(shared_data), num_cpus=2)
    assert all(s.status == "done" for s in states.values()), {s.cell.label: s.error for s in states.values()}
    rows = read_store(store).table.to_pylist()
    keys = [(r["cell_key"], r["task"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert expected <= set(keys)
    assert {r["metric"] for r in rows} == {"sparsity_actual", "perplexity", "acc", "acc_norm"}
    # the store is a Parquet dataset pandas reads directly (cell run folders live under _runs/)
    import pandas as pd

    assert len(pd.read_parquet(store)) == len(rows)
    # 3) a third run does nothing: no cell is pruned or evaluated again
    before = len(rows)
    seen = set()
    run_grid(g, store, data_dir=str(shared_data), num_cpus=2,
             on_update=lambda states: seen.update(s.status for s in states.values()))
    assert read_store(store).table.num_rows == before
    assert seen == {"done"}, seen
    # 4) the report has the paper's tables and plots
    files = build_report(store, tmp_path / "report")
    names = {p.name for ps in files.values() for p in ps}
    assert "report.md" in names and any(n.startswith("perplexity-") and n.endswith(".png") for n in names)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Perplexity" in md and "Zero-shot accuracy" in md and "**" in md
    assert "![perplexity vs sparsity](perplexity-" in md  # the plots are linked from the Markdown


def test_corrupt_store_file_is_reported_and_skipped(tmp_path):
    store = tmp_path / "store"
    row = {"run_id": "r", "cell_key": "k", "model": "m", "method": "wanda", "top_up": "uniform", "sparsity": 0.5,
           "pattern": "unstructured", "seed": 0, "calibration": "c4", "seqlen": 8, "task": "wikitext2",
           "metric": "perplexity", "value": 10.0}
    assert append_rows(store, [row]) == 1
    assert append_rows(store, [row]) == 0  # same key: skipped
    good = next(store.glob("*.parquet"))
    (store / "part-truncated.parquet").write_bytes(good.read_bytes()[:40])
    rep = read_store(store)
    assert rep.table.num_rows == 1
    assert len(rep.skipped) == 1 and rep.skipped[0][0].endswith("part-truncated.parquet")
    assert pq.read_table(good).num_rows == 1  # readable by pyarrow (and pandas/duckdb) directly
    files = build_report(store, tmp_path / "rep")
    assert "part-truncated.parquet" in (tmp_path / "rep" / "report.md").read_text()


def test_report_lists_only_failures_not_made_good_by_a_rerun(tmp_path):
    store = tmp_path / "store"
    base = {"model": "m", "method": "wanda", "top_up": "uniform", "sparsity": 0.5, "pattern": "unstructured",
            "seed": 0, "calibration": "c4", "seqlen": 8}
    fail = lambda key, task: {**base, "run_id": "failed", "cell_key": key, "task": task, "metric": "error",  # noqa: E731
                              "value": None, "note": f"{key} {task}: LocalRayletDiedError"}
    append_rows(store, [fail("a", "failed:eval:wikitext2"), fail("b", "failed:prune:"), fail("c", "failed:eval:boolq")])
    append_rows(store, [{**base, "run_id": "r", "cell_key": "a", "task": "wikitext2", "metric": "perplexity", "value": 9.0},
                        {**base, "run_id": "r", "cell_key": "b", "task": "prune", "metric": "sparsity_actual", "value": 0.5}])
    build_report(store, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "c failed:eval:boolq" in md
    assert "a failed:eval:wikitext2" not in md and "b failed:prune:" not in md
