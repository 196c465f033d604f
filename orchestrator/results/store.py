"""Append-only Parquet results store: one row per metric (DESIGN §6).

The store is a folder of Parquet files (a pyarrow dataset; pandas and duckdb read it directly:
`pd.read_parquet(folder)`, `duckdb.sql("select * from 'store/*.parquet'")`). Each write is one new
file, written to a temp name and renamed, so a reader never sees half a file. A cell key (hash of
the cell's spec) plus task and metric identify a result; writers skip rows that already exist.
A truncated or corrupt file is reported with its path and skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuroal import fileio
from neuroal.data import DATA_VERSION
from orchestrator.spec import GRID_VERSION

logger = logging.getLogger(__name__)

STORE_ENV = "NEUROAL_STORE"
DEFAULT_STORE = "runs/store"

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("cell_key", pa.string()),  # the pruned model's identity (PruneSpec.cell_key)
        ("eval_key", pa.string()),  # the evaluation's identity (spec.eval_key); "" for the prune's own rows
        ("model", pa.string()),
        ("method", pa.string()),
        ("top_up", pa.string()),
        ("sparsity", pa.float64()),
        ("pattern", pa.string()),
        ("seed", pa.int64()),
        ("calibration", pa.string()),
        ("seqlen", pa.int64()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("lambda_block", pa.float64()),
        ("lambda_row", pa.float64()),
        ("sparsity_actual", pa.float64()),
        ("wall_s", pa.float64()),
        ("host", pa.string()),
        ("versions", pa.string()),
        ("plugins", pa.string()),  # {distribution: version} of a plug-in method or top-up, as JSON ("{}": none)
        ("data_version", pa.string()),  # neuroal.data.DATA_VERSION: the calibration/evaluation protocol
        ("grid_version", pa.string()),  # orchestrator.spec.GRID_VERSION: what a cell key covers
        ("timestamp", pa.float64()),
        ("note", pa.string()),  # why a row failed, or what was special about it
        ("protocol", pa.string()),  # how the evaluation was made, in words (seqlen and windows, documents)
        ("dtype", pa.string()),  # the evaluation's compute dtype (part of its eval_key); None before it was kept
        ("request", pa.string()),  # zero-shot: the task, group or tag asked for (a group's name on its members' rows)
    ]
)


def store_dir(explicit: str | Path | None = None) -> str:
    """`--store`, else $NEUROAL_STORE, else runs/store; a local folder or a storage URI."""
    return str(explicit or os.environ.get(STORE_ENV) or DEFAULT_STORE)


@dataclass
class ReadReport:
    table: pa.Table
    skipped: list[tuple[str, str]]  # (path, reason)


def _read_table(path: str) -> pa.Table:
    if not fileio.is_uri(path):
        return pq.read_table(path)
    fs, inner = fileio.filesystem(path)
    with fs.open(inner, "rb") as f:
        return pq.read_table(f)


def read_store(folder: str | Path) -> ReadReport:
    """All rows (local folder or URI); unreadable files are logged with their path and skipped."""
    tables, skipped = [], []
    for name in fileio.listdir(folder):
        if not name.endswith(".parquet") or name.startswith("."):
            continue
        path = fileio.join(folder, name)
        try:
            t = _read_table(path)
            tables.append(t.select([n for n in SCHEMA.names if n in t.column_names]).cast(
                pa.schema([SCHEMA.field(n) for n in SCHEMA.names if n in t.column_names])))
        except Exception as exc:  # truncated, corrupt, or foreign: report and go on
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("results store: skipping unreadable %s (%s)", path, reason)
            skipped.append((path, reason))
    if not tables:
        return ReadReport(SCHEMA.empty_table(), skipped)
    return ReadReport(pa.concat_tables(tables, promote_options="default"), skipped)


def row_key(row: dict) -> tuple[str, str, str, str]:
    """What identifies a result: the pruned model, the evaluation, the task and the metric."""
    return row["cell_key"], row.get("eval_key") or "", row["task"], row["metric"]


def existing_keys(folder: str | Path) -> set[tuple[str, str, str, str]]:
    t = read_store(folder).table
    if not t.num_rows:
        return set()
    cols = {n: t.column(n).to_pylist() if n in t.column_names else [None] * t.num_rows
            for n in ("cell_key", "eval_key", "task", "metric")}
    return {row_key(dict(zip(cols, vals))) for vals in zip(*cols.values())}


def append_rows(folder: str | Path, rows: list[dict]) -> int:
    """Append rows not already present (by `row_key`); returns how many were written.

    Each write is one new Parquet file, renamed into place locally, one PUT on an object store.
    """
    if not fileio.is_uri(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
    have = existing_keys(folder)
    fresh, seen = [], set()
    for r in rows:
        key = row_key(r)
        if key in have or key in seen:
            continue
        seen.add(key)
        fresh.append({name: (r.get(name) or "") if name == "eval_key" else r.get(name) for name in SCHEMA.names})
    if not fresh:
        return 0
    table = pa.Table.from_pylist(fresh, schema=SCHEMA)
    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / name)
        fileio.put_file(Path(tmp) / name, fileio.join(folder, name))
    return len(fresh)


def run_rows(run, *, run_id: str | None = None) -> list[dict]:
    """Rows of one run (its record, or run.json): sparsity, and every evaluation on record with its
    protocol (dense perplexities as their own metric)."""
    from orchestrator.results.record import RunRecord

    rec = RunRecord.from_json(run)
    spec, data = rec.spec, rec.data
    base = {
        "run_id": run_id or data.get("run_id") or uuid.uuid4().hex[:12],
        "cell_key": rec.cell_key,
        "model": spec["model"],
        "method": spec["method"],
        "top_up": spec["top_up"],
        "sparsity": rec.sparsity_target,
        "pattern": spec["pattern"],
        "seed": spec["seed"],
        "calibration": spec["calibration"],
        "seqlen": spec["seqlen"],
        "lambda_block": rec.lambda_block,
        "lambda_row": rec.lambda_row,
        "sparsity_actual": rec.sparsity_actual,
        "wall_s": float(sum(rec.timings_s.values())),
        "host": data.get("host") or socket.gethostname(),
        "versions": json.dumps(rec.versions, sort_keys=True),
        "plugins": json.dumps(rec.plugins, sort_keys=True),
        "data_version": data.get("data_version", DATA_VERSION),
        "grid_version": data.get("grid_version", GRID_VERSION),
        "timestamp": time.time(),
    }
    rows = [] if spec["method"] == "dense" else [  # a dense model's evaluation has no prune of its own
        dict(base, task="prune", metric="sparsity_actual", value=rec.sparsity_actual, stderr=None, eval_key="")]
    for e in rec.evaluations:  # every evaluation on record, each with its protocol
        rows.append(dict(base, task=e.task, metric=e.metric, value=e.value, stderr=e.stderr, eval_key=e.eval_key,
                         protocol=e.protocol, dtype=e.dtype, request=e.request))
    info = data.get("eval_data", {})
    for name, v in rec.perplexity_dense.items():
        rows.append(dict(base, task=name, metric="perplexity_dense", value=v, stderr=None,
                         eval_key=info.get(name, {}).get("eval_key", ""), dtype=info.get(name, {}).get("dtype")))
    return rows


def append_run_rows(run: dict, folder: str | Path | None = None) -> int:
    return append_rows(store_dir(folder), run_rows(run))
