"""Benchmark grids: models × methods × top-ups × sparsities (× patterns × seeds), pruned and evaluated.

A grid is YAML validated by `Grid` (pydantic, unknown keys rejected, names checked against the
registries), with an optional `include:` base file like lm-eval task YAMLs. `neuroal grid SPEC
--store DIR` runs it on Ray:

- each cell is a Ray task that prunes (in its worker, or through shard actors for big models) into
  `DIR/_runs/<cell key>/` (the leading underscore keeps `pd.read_parquet(DIR)` on the rows alone);
- each evaluation (a perplexity dataset, a zero-shot task or group) is a Ray task on the pruned
  checkpoint; `tasks.zeroshot` takes any name lm-eval knows, and those of the grid's `zeroshot_include`
  folder (relative to the grid file), whose task files travel with the tasks;
- cells and tasks run concurrently up to what the cluster holds (explicit resources per task);
  transient failures are retried (`max_retries`, `retry_exceptions`), and failures are recorded;
- every metric is a row in the Parquet store (written by the driver only); a rerun skips rows that
  exist, so a killed grid resumes with no duplicates and no loss.
"""

from __future__ import annotations

import difflib

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neuroal.allocation import ALLOCATORS
from neuroal.data import DATA_VERSION
from neuroal.errors import SpecError
from neuroal.methods import METHODS, parse_pattern
from neuroal.zeroshot import TaskFolder, check_tasks
from orchestrator.chain.ray_runtime import TransientError, ray_instance, transient
from orchestrator.evaluation.zeroshot import task_folder
from orchestrator.results.evaluations import keyed_zeroshot, zeroshot_key
from orchestrator.spec import (GRID_VERSION, PruneSpec, build_spec, check_datasets, check_sparsity, first_error,
                               zeroshot_folder)

logger = logging.getLogger(__name__)
RUNS_DIR = "_runs"  # cell run folders inside the store; pyarrow skips "_" paths when reading rows


class Tasks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    perplexity: list[str] = Field(default_factory=lambda: ["wikitext2"])
    zeroshot: list[str] = Field(default_factory=list)  # lm-eval names, checked by the Grid (with its include folder)

    @field_validator("perplexity")
    @classmethod
    def _ppl(cls, v):
        check_datasets(v, "tasks.perplexity")
        return v


class Resources(BaseModel):
    """Ray resources per task; GPUs for large models, CPUs here."""

    model_config = ConfigDict(extra="forbid")

    cell_cpus: float = 1
    cell_gpus: float = 0
    eval_cpus: float = 1
    eval_gpus: float = 0
    max_retries: int = 2


class Grid(BaseModel):
    """A benchmark grid (see grids/smoke.yaml for a commented example)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "grid"
    version: str = GRID_VERSION
    models: list[str]
    methods: list[str] = Field(default_factory=lambda: ["wanda"])
    top_ups: list[str] = Field(default_factory=lambda: ["uniform"])
    sparsities: list[float] = Field(default_factory=lambda: [0.5])
    patterns: list[str] = Field(default_factory=lambda: ["unstructured"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    calibration: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    tasks: Tasks = Field(default_factory=Tasks)
    eval_windows: int | None = None
    zeroshot_limit: int | None = None
    zeroshot_include: str | None = None  # a folder of the user's lm-eval task YAMLs, relative to the grid file
    num_fewshot: int = 0  # examples per zero-shot prompt (lm-eval's --num_fewshot)
    prune: dict[str, Any] = Field(default_factory=dict)  # any other PruneSpec field, for every cell
    resources: Resources = Field(default_factory=Resources)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        return [METHODS.canonical(m) for m in v]

    @field_validator("top_ups")
    @classmethod
    def _top_ups(cls, v):
        return [ALLOCATORS.canonical(t) for t in v]

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v):
        return ["unstructured" if parse_pattern(p) is None else str(parse_pattern(p)) for p in v]

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v):
        for s in v:
            check_sparsity(s, "sparsities")
        return v

    @field_validator("zeroshot_include")
    @classmethod
    def _zeroshot_include(cls, v):
        return None if v is None else zeroshot_folder(v, "zeroshot_include")

    @field_validator("num_fewshot")
    @classmethod
    def _num_fewshot(cls, v):
        if v < 0:
            raise SpecError("num_fewshot", v, "a non-negative integer")
        return v

    @model_validator(mode="after")
    def _zeroshot(self):
        if self.tasks.zeroshot:
            check_tasks(self.tasks.zeroshot, self.zeroshot_include, field="tasks.zeroshot")
        return self

    @field_validator("prune")
    @classmethod
    def _prune(cls, v):
        reserved = {"model", "method", "top_up", "sparsity", "pattern", "seed", "calibration", "nsamples", "seqlen",
                    "eval", "out", "eval_windows", "zeroshot", "zeroshot_limit", "zeroshot_include", "num_fewshot"}
        for key in v:
            if key in reserved:
                raise SpecError(f"prune.{key}", v[key], "set it at the top level of the grid")
            if key not in PruneSpec.model_fields:
                raise SpecError("prune", key, sorted(set(PruneSpec.model_fields) - reserved))
        return v


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML (following `include:` bases); one-line SpecError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("grid", str(path), "a readable YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError("grid", str(path), f"valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpecError("grid", str(path), "a YAML mapping of grid keys")
    if isinstance(raw.get("zeroshot_include"), str):  # relative to the file that names it
        raw["zeroshot_include"] = str(path.parent / Path(raw["zeroshot_include"]).expanduser())
    if "include" in raw:
        base = load_grid(path.parent / raw.pop("include")).model_dump(exclude_unset=True)
        raw = _deep_merge(base, raw)
    try:
        return Grid(**raw)
    except ValidationError as exc:
        err = first_error(exc)
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = Grid.model_fields if len(err["loc"]) == 1 else (Tasks.model_fields if err["loc"][0] == "tasks" else Resources.model_fields)
            close = difflib.get_close_matches(str(err["loc"][-1]), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"grid key {loc!r}", "unknown", ", ".join(sorted(allowed)) + hint) from None
        if err["type"] == "missing":
            raise SpecError(f"grid key {loc!r}", "missing", "required") from None
        raise SpecError(f"grid key {loc!r}", err.get("input"), err["msg"]) from None


@dataclass
class Cell:
    spec: PruneSpec
    key: str
    evals: list[tuple[str, str]]  # ("perplexity", dataset) | ("zeroshot", task)
    label: str = ""
    zeroshot_keys: dict[str, str] = field(default_factory=dict)  # zero-shot task -> the eval key its rows carry
    plain_zeroshot: frozenset[str] = frozenset()  # 0-shot stock tasks: a grid's rows from before eval keys count


@dataclass
class GridCells:
    cells: list[Cell]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)


def expand(grid: Grid, store: Path) -> GridCells:
    """Every valid cell of the grid; combinations a prune would reject are skipped with the reason."""
    plan = GridCells(cells=[])
    seen = set()
    evals = [("perplexity", d) for d in grid.tasks.perplexity] + [("zeroshot", t) for t in grid.tasks.zeroshot]
    include = task_folder(grid.zeroshot_include) if grid.tasks.zeroshot else None
    keys = {t: zeroshot_key(t, grid.zeroshot_limit, num_fewshot=grid.num_fewshot, include=include,
                            dtype=eval_dtype(grid)) for t in grid.tasks.zeroshot}
    plain = frozenset(t for t in grid.tasks.zeroshot
                      if grid.num_fewshot == 0 and (include is None or t not in include.names))
    for model, method, top_up, sparsity, pattern, seed in itertools.product(
        grid.models, grid.methods, grid.top_ups, grid.sparsities, grid.patterns, grid.seeds
    ):
        p = parse_pattern(pattern)
        if p is not None:
            sparsity = p.sparsity  # N:M fixes the sparsity: one cell per pattern
        label = f"{model.split('/')[-1]} {method} {top_up} {sparsity:g} {pattern} s{seed}"
        extra = {"executor": "local", **grid.prune}  # a cell prunes inside its Ray task unless told otherwise
        try:
            spec = build_spec(model=model, method=method, top_up=top_up, sparsity=sparsity, pattern=pattern, seed=seed,
                              calibration=grid.calibration, nsamples=grid.nsamples, seqlen=grid.seqlen,
                              eval_windows=grid.eval_windows, **extra)
        except SpecError as exc:
            if (label, str(exc)) not in plan.skipped:  # N:M: every sparsity names the same cell
                plan.skipped.append((label, str(exc)))
            continue
        key = spec.cell_key()
        if key in seen:
            continue
        seen.add(key)
        spec = spec.model_copy(update={"out": str(store / RUNS_DIR / key)})
        plan.cells.append(Cell(spec, key, evals, label, keys, plain))
    return plan


def eval_dtype(grid: Grid) -> str:
    """The compute dtype of the grid's evaluations (part of their identity): the grid's `dtype`, else
    what "auto" gives on the devices an evaluation task asks for (`eval_gpus`: bfloat16)."""
    dtype = grid.prune.get("dtype", "auto")
    if dtype != "auto":
        return dtype
    return "bfloat16" if grid.resources.eval_gpus else "float32"


def expected_rows(cell: Cell) -> set[tuple[str, str, str]]:
    """The (cell_key, task, metric) rows a finished cell has whatever its tasks report: the prune's and
    each perplexity's (a zero-shot task's metrics are lm-eval's: `evaluations_left` looks for its key)."""
    rows = {(cell.key, "prune", "sparsity_actual")}
    rows.update((cell.key, name, "perplexity") for kind, name in cell.evals if kind == "perplexity")
    return rows


def evaluations_left(cell: Cell, have: set[tuple[str, str, str, str]]) -> list[tuple[str, str]]:
    """The evaluations of `cell` the store lacks; `have` is its (cell_key, eval_key, task, metric) rows.

    A perplexity is done with its row; a zero-shot task (or group) with any row of its eval key, or,
    for a 0-shot stock task, the `acc` row an older grid wrote without a key.
    """
    mine = {(k, t, m) for c, k, t, m in have if c == cell.key}
    keys = {k for k, _, _ in mine}
    left = []
    for kind, name in cell.evals:
        if kind == "perplexity":
            done = any(t == name and m == "perplexity" for _, t, m in mine)
        else:
            done = cell.zeroshot_keys[name] in keys or (name in cell.plain_zeroshot and ("", name, "acc") in mine)
        if not done:
            left.append((kind, name))
    return left


def cell_done(cell: Cell, have: set[tuple[str, str, str, str]]) -> bool:
    """The store holds the cell's prune row and every evaluation it asks for."""
    pruned = any(c == cell.key and t == "prune" and m == "sparsity_actual" for c, _, t, m in have)
    return pruned and not evaluations_left(cell, have)


# ---------------------------------------------------------------- work done inside Ray tasks


def prune_cell(spec_json: dict, data_dir: str | None) -> dict:
    """Ray task: prune one cell into its run folder (resumes a finished identical run)."""
    from orchestrator.pruning.job import prune

    spec = PruneSpec(**spec_json)
    if data_dir:
        spec = spec.model_copy(update={"data_dir": data_dir})
    try:
        return prune(spec, store=False).to_json()  # host data across the Ray boundary
    except Exception as exc:
        if transient(exc):
            raise TransientError(f"out of memory pruning {spec.out}: {exc}") from exc
        raise


def eval_cell(run_dir: str, kind: str, name: str, seqlen: int, data_dir: str | None, eval_windows: int | None,
              zeroshot_limit: int | None, num_fewshot: int = 0, include: TaskFolder | None = None,
              dtype: str = "float32") -> list[dict]:
    """Ray task: one evaluation of a pruned checkpoint on the devices Ray gave it; returns metric dicts
    (zero-shot: keyed, `keyed_zeroshot`)."""
    from neuroal.data import resolve_data_dir
    from orchestrator.evaluation.perplexity import perplexity
    from orchestrator.evaluation.zeroshot import zeroshot
    from orchestrator.chain.session import open_session

    try:
        if kind == "zeroshot":
            rows = zeroshot(run_dir, [name], data_dir, zeroshot_limit, num_fewshot=num_fewshot, include=include,
                            dtype=dtype)
            return keyed_zeroshot(rows, zeroshot_limit, num_fewshot=num_fewshot, include=include)
        session = open_session(run_dir, executor="local", seqlen=seqlen, dtype=dtype)  # "auto" device: the task's GPU
        try:
            value, info = perplexity(session, name, seqlen, resolve_data_dir(data_dir), max_windows=eval_windows)
        finally:
            session.close()
    except Exception as exc:
        if transient(exc):
            raise TransientError(f"out of memory evaluating {name} on {run_dir}: {exc}") from exc
        raise
    return [{"task": name, "metric": "perplexity", "value": value, "stderr": None, "info": info, "dtype": dtype}]


# ---------------------------------------------------------------- the driver


@dataclass
class CellState:
    cell: Cell
    status: str = "queued"  # queued | pruning | evaluating | done | failed | skipped
    evals_left: int = 0
    error: str | None = None
    run: dict | None = None


def run_grid(grid: Grid, store: Path, *, data_dir: str | None = None, address: str | None = None,
             num_cpus: int | None = None, on_update=None) -> dict[str, CellState]:
    """Run every missing cell and evaluation of `grid` on Ray; returns the final state per cell."""
    with ray_instance(address, num_cpus):  # first: an address that does not answer leaves no store behind
        return _run_cells(grid, Path(store), data_dir, on_update)


def _run_cells(grid: Grid, store: Path, data_dir: str | None, on_update) -> dict[str, CellState]:
    import ray

    from orchestrator.results.store import append_rows, existing_keys, run_rows

    store.mkdir(parents=True, exist_ok=True)
    plan = expand(grid, store)
    have = existing_keys(store)
    include = task_folder(grid.zeroshot_include) if grid.tasks.zeroshot else None  # read once, sent with the tasks
    states = {c.key: CellState(c) for c in plan.cells}
    on_update = on_update or (lambda states: None)

    res = grid.resources
    retry = dict(max_retries=res.max_retries, retry_exceptions=[TransientError])
    prune_remote = ray.remote(prune_cell).options(num_cpus=res.cell_cpus, num_gpus=res.cell_gpus, **retry)
    eval_remote = ray.remote(eval_cell).options(num_cpus=res.eval_cpus, num_gpus=res.eval_gpus, **retry)

    pending: dict[Any, tuple[str, str, tuple | None]] = {}  # ref -> (cell key, kind, eval)
    for key, st in states.items():
        if cell_done(st.cell, have):
            st.status = "done"
            continue
        st.status = "pruning"
        pending[prune_remote.remote(st.cell.spec.model_dump(mode="json"), data_dir)] = (key, "prune", None)
    on_update(states)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        key, kind, ev = pending.pop(ref)
        st = states[key]
        try:
            out = ray.get(ref)
        except Exception as exc:  # recorded, never silently dropped
            cause = getattr(exc, "cause", None) or exc
            kind_of = "transient, retried" if _is_transient(exc, cause) else "error"
            st.status = "failed"
            st.error = f"{kind} {ev or ''} ({kind_of}): {type(cause).__name__}: {cause}".strip()
            logger.error("cell %s failed: %s", st.cell.label, st.error)
            append_rows(store, [_failure_row(st, kind, ev)])
            on_update(states)
            continue
        if kind == "prune":
            st.run = out
            append_rows(store, [r for r in run_rows(out) if r["task"] == "prune"])
            todo = evaluations_left(st.cell, have)
            st.evals_left = len(todo)
            st.status = "evaluating" if todo else "done"
            for e in todo:
                r = eval_remote.remote(st.cell.spec.out, e[0], e[1], grid.seqlen, data_dir, grid.eval_windows,
                                       grid.zeroshot_limit, grid.num_fewshot, include, eval_dtype(grid))
                pending[r] = (key, "eval", e)
        else:
            rows = [dict(base, **m, protocol=_protocol(m, grid)) for base in [_base_row(st)] for m in out]
            append_rows(store, [{k: v for k, v in r.items() if k not in ("info", "n_docs")} for r in rows])
            st.evals_left -= 1
            if st.evals_left == 0 and st.status != "failed":
                st.status = "done"
        on_update(states)
    return states


def _protocol(metric: dict, grid: Grid) -> str:
    from orchestrator.results.evaluations import protocol

    info = metric.get("info")
    if info is None:
        return protocol(limit=grid.zeroshot_limit, n_docs=metric.get("n_docs"), num_fewshot=grid.num_fewshot,
                        dtype=metric.get("dtype"))
    return protocol(seqlen=grid.seqlen, windows=info["windows"], windows_available=info["windows_available"],
                    dtype=metric.get("dtype"))


def _is_transient(exc: BaseException, cause: BaseException) -> bool:
    """Out of memory, or a worker/node lost: Ray retried it `max_retries` times before giving up."""
    import ray

    lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
            ray.exceptions.TaskUnschedulableError)
    return isinstance(cause, TransientError) or isinstance(exc, lost)


def _base_row(st: CellState) -> dict:
    from orchestrator.results.store import run_rows

    return {k: v for k, v in run_rows(st.run)[0].items() if k not in ("task", "metric", "value", "stderr")}


def _failure_row(st: CellState, kind: str, ev) -> dict:
    spec = st.cell.spec
    return {"run_id": "failed", "cell_key": st.cell.key, "model": spec.model, "method": spec.method,
            "top_up": spec.top_up, "sparsity": spec.effective_sparsity, "pattern": spec.pattern, "seed": spec.seed,
            "calibration": spec.calibration, "seqlen": spec.seqlen, "task": f"failed:{kind}:{ev[1] if ev else ''}",
            "metric": "error", "value": None, "stderr": None, "timestamp": time.time(), "note": st.error,
            "plugins": json.dumps(spec.plugins(), sort_keys=True),
            "data_version": DATA_VERSION, "grid_version": GRID_VERSION}
