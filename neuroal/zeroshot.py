"""Zero-shot accuracy through the stock lm-evaluation-harness 0.4.x, with the hub or fully offline.

The model (an already loaded transformers causal LM) is wrapped in lm-eval's `HFLM` and scored by
`lm_eval.simple_evaluate`, 0-shot, on any of `TASKS`:

* **online** (no data folder): lm-eval's stock tasks by their stock names, datasets from the HF hub;
* **offline** (`data_dir` given, or env `NEUROAL_DATA_DIR` set and holding the files): the project's
  task YAMLs `neuroal/tasks/<task>_local.yaml`, which carry the stock prompts, targets, choices and
  metrics verbatim and read local files through `custom_dataset` hooks (`neuroal/tasks/`).
  The data folder is handed to the hooks at run time as TaskManager metadata. Results are reported
  under the stock task name. The few places where the local data differs from the stock dataset are
  listed in `OFFLINE_DEVIATIONS` and documented in each YAML / hook docstring.

Reported metrics are `acc` and, where the stock task has it (hellaswag, arc_*, openbookqa),
`acc_norm`, each with lm-eval's standard error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from neuroal.errors import DataError, SpecError
from neuroal.tasks import local_files as _local
from neuroal.zeroshot_packing import packed_lm_class

logger = logging.getLogger(__name__)

TASKS = ("rte", "winogrande", "boolq", "hellaswag", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
ENV_DATA_DIR = _local.ENV_DATA_DIR
OFFLINE_TASK_NAMES = {task: _local.LOCAL_TASKS[task][0] for task in TASKS}
OFFLINE_DEVIATIONS = dict(_local.DEVIATIONS)


@dataclass(frozen=True)
class ZeroShotResult:
    task: str  # stock lm-eval task name (also for the offline twin)
    metric: str  # "acc" or "acc_norm"
    value: float
    stderr: float  # nan when lm-eval reports none
    n_docs: int  # documents actually scored (after `limit`)


# ----------------------------------------------------------------------------- validation


def _check_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(tasks))  # de-duplicated, order kept
    if not names:
        raise SpecError("tasks", list(tasks), TASKS)
    for name in names:
        if name not in TASKS:
            raise SpecError("tasks", name, TASKS)
    return names


def _check_files(tasks: list[str], data_dir) -> None:
    for task in tasks:
        missing = _local.missing_files(task, data_dir)
        if missing:
            raise DataError(
                f"zero-shot data: missing file {missing[0]} for task {task!r} "
                f"(data folder {_local.resolve_zeroshot_dir(data_dir)})"
            )


def _offline_dir(tasks: list[str], data_dir: Path | str | None) -> Path | None:
    """The data folder to use offline, or None for the stock (hub) tasks."""
    if data_dir is not None:
        _check_files(tasks, data_dir)
        return Path(data_dir)
    env = os.environ.get(ENV_DATA_DIR)
    if not env:
        return None
    lacking = {task: _local.missing_files(task, env) for task in tasks}
    lacking = {task: paths for task, paths in lacking.items() if paths}
    if lacking:
        logger.warning(
            "%s=%s lacks files for %s (e.g. %s); using the stock lm-eval tasks (HF hub)",
            ENV_DATA_DIR,
            env,
            ", ".join(lacking),
            next(iter(lacking.values()))[0],
        )
        return None
    return Path(env)


# ----------------------------------------------------------------------------- lm-eval plumbing


@contextlib.contextmanager
def _quiet():
    """Silence lm-eval's INFO/WARNING chatter and progress bars (lm-eval's request-building bar,
    datasets' bars) for the duration, unless DEBUG is enabled on this module's logger. A level set
    explicitly on the `lm_eval` logger by the caller is respected."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    import datasets
    import lm_eval.api.task as lm_task

    lm_logger = logging.getLogger("lm_eval")
    old_level = lm_logger.level
    bars = datasets.is_progress_bar_enabled()
    old_tqdm = getattr(lm_task, "tqdm", None)
    if old_level == logging.NOTSET:
        lm_logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    if old_tqdm is not None:
        lm_task.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        yield
    finally:
        lm_logger.setLevel(old_level)
        if bars:
            datasets.enable_progress_bars()
        if old_tqdm is not None:
            lm_task.tqdm = old_tqdm


def _task_manager(offline_dir: Path | None):
    from lm_eval.tasks import TaskManager

    if offline_dir is None:
        return _stock_task_manager()
    # only the project's YAMLs: fast to index, and no name can clash with a stock task
    return TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,
        metadata={"data_dir": str(Path(offline_dir).expanduser().resolve())},
    )


@functools.lru_cache(maxsize=1)
def _stock_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes every stock YAML (~10 s), so built once per process


def _load_tasks(manager, names: list[str], offline: bool) -> dict:
    """lm-eval Task objects keyed by the name lm-eval runs them under (datasets are read here)."""
    run_names = [OFFLINE_TASK_NAMES[n] if offline else n for n in names]
    try:
        return manager.load(run_names)["tasks"]
    except DataError:
        raise
    except Exception as exc:
        if offline:
            raise
        raise DataError(
            f"zero-shot data: cannot load the stock lm-eval tasks {names} from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); for offline use pass data_dir (--data-dir) or set {ENV_DATA_DIR}"
        ) from exc


# requests per forward pass when `batch_size` is None. CPU: 32 measured on SmolLM2 (benchmarks/eval_speed.py:
# 4.5x stock HFLM at its batch 1, 2.3x stock at batch 32); CUDA: a choice, not yet measured on a GPU
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 256}


def default_batch_size(device) -> int:
    """Requests per forward pass for `device` (a string or torch.device) when none is given."""
    kind = str(device).split(":")[0]
    return DEFAULT_BATCH_SIZE.get(kind, DEFAULT_BATCH_SIZE["cpu"])


def _make_lm(model, tokenizer, batch_size: int, device: str, packed: bool = True):
    import torch
    from lm_eval.models.huggingface import HFLM

    if getattr(model, "device", None) != torch.device(device) and not hasattr(model, "hf_device_map"):
        model.to(device)
    model.eval()
    cls = packed_lm_class() if packed else HFLM
    lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    lm.show_progress = logger.isEnabledFor(logging.DEBUG)
    return lm


def _number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan  # lm-eval writes "N/A" when it has no stderr


# ----------------------------------------------------------------------------- public API


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks,
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    packed: bool = True,
) -> list[ZeroShotResult]:
    """Score `model` 0-shot on `tasks` with lm-eval; one result per (task, metric).

    Args:
        model: a transformers causal LM (moved to `device` in place if it is elsewhere).
        tokenizer: its tokenizer.
        tasks: names from `TASKS` (order kept, duplicates dropped).
        data_dir: local data root (`<data_dir>/zeroshot/<task>/...`, or the zeroshot folder itself):
            use the offline task twins. None: env NEUROAL_DATA_DIR if it holds the files, else the
            stock tasks from the HF hub.
        limit: score only the first `limit` documents of each task (smoke tests).
        batch_size: requests per forward pass (None: chosen for the device, `default_batch_size`).
        device: torch device for the forward passes.
        packed: score a context once with all its continuations (`PackedHFLM`); False runs stock
            lm-eval `HFLM` unchanged (the reference the packed path is tested against).

    Returns:
        `ZeroShotResult`s in task order, `acc` then `acc_norm` (where the stock task has it).

    Raises:
        SpecError: unknown task, bad `limit` / `batch_size`.
        DataError: a local file is missing or malformed, or the stock datasets cannot be fetched.
    """
    names = _check_tasks(tasks)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpecError("limit", limit, "a positive integer or None")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError("batch_size", batch_size, "a positive integer")
    offline_dir = _offline_dir(names, data_dir)
    logger.info(
        "zero-shot eval of %s (%s)%s",
        ", ".join(names),
        f"offline, data {offline_dir}" if offline_dir is not None else "stock lm-eval tasks",
        f", limit {limit}" if limit else "",
    )

    import lm_eval

    offline = offline_dir is not None
    with _quiet():
        manager = _task_manager(offline_dir)
        loaded = _load_tasks(manager, names, offline)
        lm = _make_lm(model, tokenizer, batch_size, device, packed)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(loaded.values()),
            num_fewshot=0,
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=False,
            task_manager=manager,
        )
    if out is None:  # not rank 0 of a distributed run
        return []

    results: list[ZeroShotResult] = []
    for name in names:
        run_name = OFFLINE_TASK_NAMES[name] if offline else name
        row = out["results"][run_name]
        n_docs = int(out.get("n-samples", {}).get(run_name, {}).get("effective", 0))
        for metric in METRICS:
            key = f"{metric},none"
            if key not in row:
                continue
            results.append(
                ZeroShotResult(
                    task=name,
                    metric=metric,
                    value=_number(row[key]),
                    stderr=_number(row.get(f"{metric}_stderr,none")),
                    n_docs=n_docs,
                )
            )
            logger.info("%s %s = %.4f ± %.4f (n=%d)", name, metric, results[-1].value, results[-1].stderr, n_docs)
    return results


def count_docs(task: str, data_dir: Path | str | None = None) -> int:
    """Number of evaluation documents the offline twin of `task` yields from `data_dir`.

    Loads the task through lm-eval exactly as `evaluate_zeroshot` does (YAML + hook), no model.
    """
    (name,) = _check_tasks([task])
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR)
    if not data_dir:
        raise DataError(f"zero-shot data: no data folder given; pass data_dir or set {ENV_DATA_DIR}")
    _check_files([name], data_dir)
    with _quiet():
        loaded = _load_tasks(_task_manager(Path(data_dir)), [name], True)
    return len(loaded[OFFLINE_TASK_NAMES[name]].eval_docs)
