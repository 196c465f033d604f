"""The report's zero-shot mean: each name asked for counts once (a group by its own aggregate)."""

import pandas as pd
import pytest

from orchestrator.results.report import build_report
from orchestrator.results.store import append_rows, read_store, run_rows

BASE = {"run_id": "r", "cell_key": "k", "eval_key": "e", "model": "m", "method": "wanda", "top_up": "uniform",
        "sparsity": 0.5, "pattern": "unstructured", "seed": 0, "calibration": "c4", "seqlen": 32,
        "metric": "acc", "stderr": 0.1, "protocol": "10 documents"}


def _mean(report_dir) -> float:
    table = pd.read_csv(next(report_dir.glob("zeroshot-m-unstructured.csv")), header=[0, 1], index_col=[0, 1])
    return float(table[("0.5", "mean")].iloc[0])


def test_a_group_counts_once_in_the_mean_by_its_own_aggregate(tmp_path):
    # asked: the group `grp` (lm-eval gives its aggregate and its two members) and the task `solo`
    append_rows(tmp_path / "store", [
        dict(BASE, task="grp", request="grp", value=0.6),
        dict(BASE, task="grp_a", request="grp", value=0.5),
        dict(BASE, task="grp_b", request="grp", value=0.7),
        dict(BASE, task="solo", request="solo", value=0.2)])
    build_report(tmp_path / "store", tmp_path / "report")
    assert _mean(tmp_path / "report") == pytest.approx((0.6 + 0.2) / 2)  # not (0.6 + 0.5 + 0.7 + 0.2) / 4
    md = (tmp_path / "report" / "report.md").read_text()
    assert "grp_a" in md and "grp_b" in md  # the members keep their columns


def test_members_of_a_group_without_an_aggregate_each_count(tmp_path):
    append_rows(tmp_path / "store", [dict(BASE, task="tag_a", request="tag", value=0.5),
                                     dict(BASE, task="tag_b", request="tag", value=0.7),
                                     dict(BASE, task="solo", request="solo", value=0.3)])
    build_report(tmp_path / "store", tmp_path / "report")
    assert _mean(tmp_path / "report") == pytest.approx(0.5)


def test_a_store_written_before_requests_were_kept_averages_every_task(tmp_path):
    append_rows(tmp_path / "store", [dict(BASE, task="grp", value=0.6), dict(BASE, task="grp_a", value=0.5)])
    build_report(tmp_path / "store", tmp_path / "report")
    assert _mean(tmp_path / "report") == pytest.approx(0.55)


def test_a_runs_rows_keep_the_name_each_result_was_asked_under(tmp_path):
    run = {"spec": {"model": "m", "method": "wanda", "top_up": "uniform", "pattern": "unstructured", "seed": 0,
                    "calibration": "c4", "seqlen": 32},
           "cell_key": "k", "sparsity_target": 0.5, "sparsity_actual": 0.5,
           "zeroshot": [{"task": "grp_a", "metric": "acc", "value": 0.5, "stderr": 0.1, "n_docs": 10,
                         "eval_key": "z", "request": "grp"}]}
    rows = run_rows(run)
    assert [(r["task"], r.get("request")) for r in rows] == [("prune", None), ("grp_a", "grp")]
    append_rows(tmp_path / "store", rows)
    stored = read_store(tmp_path / "store").table.to_pylist()
    assert {(r["task"], r["request"]) for r in stored} == {("prune", None), ("grp_a", "grp")}
