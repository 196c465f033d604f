"""Zero-shot and few-shot scores through the stock lm-evaluation-harness 0.4.x, with the hub or offline.

The model (an already loaded transformers causal LM) is wrapped in lm-eval's `HFLM` and scored by
`lm_eval.simple_evaluate`. Each name in `tasks` is, in this order of precedence:

* a task, group or tag defined by a YAML in `include_path` (lm-eval's `--include_path`, the user's
  own tasks; as in lm-eval, they override stock tasks of the same name);
* one of the seven `TASKS` when a data folder holds its files (`data_dir`, or env `NEUROAL_DATA_DIR`):
  the project's offline twin `neuroal/tasks/<task>_local.yaml`, which carries the stock prompts,
  targets, choices and metrics verbatim and reads local files through `custom_dataset` hooks
  (`neuroal/tasks/`). The data folder reaches the hooks as TaskManager metadata; results are reported
  under the stock task name. Where the local data differs from the stock dataset is listed in
  `OFFLINE_DEVIATIONS` and documented in each YAML / hook docstring;
* any other task, group or tag the installed lm-eval knows, its dataset from the Hugging Face hub
  (or the local datasets cache). Without the hub it fails with one line saying how to get it.

Scoring: loglikelihood (multiple-choice) requests go through `PackedHFLM` (each context once with all
its continuations; the numbers stock HFLM computes). `generate_until` and `loglikelihood_rolling`
requests run stock HFLM's own code: `PackedHFLM` inherits both (its wrappers only hide their progress
bars), and the rolling windows reach `_loglikelihood_tokens` with `override_bs`, the stock path.

Results keep lm-eval's names: one `ZeroShotResult` per (task, metric with its filter), the metric
written as lm-eval keys it without the ",none" filter (`acc`, `acc_norm`, `exact_match,strict-match`,
`exact_match,flexible-extract`). A group gives its own aggregate rows (when lm-eval computes one) and
its subtasks' rows.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from neuroal.errors import DataError, SpecError
from neuroal.tasks import local_files as _local
from neuroal.zeroshot_packing import packed_lm_class

logger = logging.getLogger(__name__)

TASKS = ("rte", "winogrande", "boolq", "hellaswag", "arc_easy", "arc_challenge", "openbookqa")  # offline twins
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
ENV_DATA_DIR = _local.ENV_DATA_DIR
OFFLINE_TASK_NAMES = {task: _local.LOCAL_TASKS[task][0] for task in TASKS}
OFFLINE_DEVIATIONS = dict(_local.DEVIATIONS)
TASK_FILE_SUFFIXES = (".yaml", ".py")  # what defines a task: YAMLs and their `!function` hooks
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm-eval's index


@dataclass(frozen=True)
class ZeroShotResult:
    task: str  # lm-eval's result name: a task (the stock name for an offline twin), a group's subtask or the group
    metric: str  # lm-eval's metric key without a ",none" filter: "acc", "acc_norm", "exact_match,strict-match"
    value: float
    stderr: float  # nan when lm-eval reports none
    n_docs: int  # documents actually scored (after `limit`; a group's aggregate: the documents behind it)
    request: str  # the name asked for: the task itself, or the group or tag it was scored under


@dataclass(frozen=True)
class TaskFolder:
    """A user's task folder (`--zeroshot-include`) as read once: what it defines and a digest of it.

    The YAML and `.py` hook files travel by value (`files`), so a process on another machine can run
    the tasks (`write_task_folder`); data files the YAMLs name are read where the tasks run.
    """

    path: str  # absolute, on the machine that read it
    files: tuple[tuple[str, str], ...]  # (path relative to the folder, text) of every .yaml and .py file
    names: frozenset[str]  # the tasks, groups and tags its YAMLs define
    digest: str  # sha256 of `files`: what an evaluation's key records of these definitions


# ----------------------------------------------------------------------------- task folders


def _folder_index(folder: Path) -> tuple[frozenset[str], list[str]]:
    """The task, group and tag names the YAMLs under `folder` define (lm-eval's own index of them,
    functions unresolved: fast) and the YAMLs it could not read, as "path (error)"."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    index, unreadable = {}, []
    for path in TaskIndex._iter_yaml_files(folder):
        try:
            TaskIndex.process_cfg(load_yaml(path, resolve_func=False, recursive=True), path, index)
        except Exception as exc:  # lm-eval's index skips these too; we say so when a name is not found
            unreadable.append(f"{path.relative_to(folder)} ({_first_line(exc)})")
    return frozenset(index), unreadable


def _task_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("**/*") if p.suffix in TASK_FILE_SUFFIXES and p.is_file()
                  and not _IGNORED_DIRS.intersection(p.relative_to(folder).parts))


def _as_folder(path, field: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SpecError(field, str(path), "a folder of lm-eval task YAMLs")
    return folder.resolve()


def read_task_folder(path, *, field: str = "include_path") -> TaskFolder:
    """Read a task folder: every .yaml / .py file under it, the names its YAMLs define, their digest.

    Raises:
        SpecError: `path` is not a folder, a file is not UTF-8 text, or no YAML defines a task.
    """
    folder = _as_folder(path, field)
    files = []
    for p in _task_files(folder):
        try:
            files.append((p.relative_to(folder).as_posix(), p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(field, str(p), f"a readable UTF-8 task file ({type(exc).__name__})") from None
    names, unreadable = _folder_index(folder)
    if not names:
        why = f"; unreadable: {unreadable[0]}" if unreadable else ""
        raise SpecError(field, str(path), f"a folder of lm-eval task YAMLs (none defines a task, group or tag{why})")
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    return TaskFolder(str(folder), tuple(files), names, digest)


def write_task_folder(folder: TaskFolder, where: Path) -> Path:
    """Write `folder`'s files under `where` (a process that cannot read the original); returns `where`."""
    for rel, text in folder.files:
        target = Path(where) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return Path(where)


# ----------------------------------------------------------------------------- validation


def check_tasks(tasks, include_path=None, *, field: str = "tasks") -> list[str]:
    """The task names, de-duplicated in order; each one a task, group or tag lm-eval knows.

    The seven `TASKS` and the names `include_path` defines are checked without lm-eval's stock index;
    any other name is looked up in it (built once per process, ~10 s).

    Raises:
        SpecError: no names, or an unknown name (with the closest known names).
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(tasks))
    if not names:
        raise SpecError(field, list(tasks), "one or more lm-eval task, group or tag names")
    own, unreadable = _folder_index(_as_folder(include_path, field)) if include_path else (frozenset(), [])
    unknown = [n for n in names if n not in own and n not in TASKS]
    if unknown:
        stock = _stock_task_manager().all_tasks
        known = set(stock)
        for name in unknown:
            if name not in known:
                raise SpecError(field, name, _unknown_hint(name, [*TASKS, *sorted(own), *stock], include_path,
                                                           unreadable))
    return names


def _unknown_hint(name: str, known: list[str], include_path, unreadable: list[str]) -> str:
    import lm_eval

    version = getattr(lm_eval, "__version__", "0.4")
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=3)
    hint = f"a task, group or tag of lm-eval {version}"
    hint += f" or of {include_path}" if include_path else " (or your own: --zeroshot-include DIR)"
    if close:
        hint += f"; did you mean {', '.join(repr(c) for c in close)}?"
    if unreadable:
        hint += f" ({len(unreadable)} YAML(s) in {include_path} could not be read, e.g. {unreadable[0]})"
    return hint


def _check_twin(task: str) -> str:
    if task not in TASKS:
        raise SpecError("tasks", task, TASKS)
    return task


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


def _include_manager(folder: Path, with_defaults: bool):
    """lm-eval's `--include_path`: the folder's own YAMLs alone (fast), or over the stock index when
    they refer to stock tasks by name (a group listing them)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=with_defaults)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _unreachable(exc: BaseException) -> bool:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return offline or isinstance(exc, (ConnectionError, TimeoutError)) or "Couldn't reach" in str(exc)


def _stock_failure(name: str, manager, exc: BaseException) -> DataError:
    """One line on a stock task that cannot be loaded; how to get it when the hub is out of reach."""
    if not _unreachable(exc):
        return DataError(f"zero-shot: lm-eval task {name!r} cannot be loaded ({_first_line(exc)})")
    entry = manager.task_index.get(name)
    path = (entry.cfg or {}).get("dataset_path") if entry is not None else None
    twin = (f"; or pass --data-dir (or set {ENV_DATA_DIR}) to a folder holding its offline files"
            if name in TASKS else "")
    return DataError(
        f"zero-shot: task {name!r} is not available offline: its data{f' ({path})' if path else ''} comes from "
        f"the Hugging Face hub, which cannot be reached ({_first_line(exc)}); run it once with the hub reachable "
        f"(the datasets cache then keeps it), or write a task YAML over local files and pass --zeroshot-include "
        f"DIR{twin}"
    )


@dataclass
class _Request:
    """One requested name as lm-eval runs it."""

    name: str
    objects: list  # the Task / Group objects handed to simple_evaluate
    results: list[str]  # the result names it yields, in report order (a group, then its members)
    groups: frozenset[str]


def _built(manager, name: str, run_name: str) -> _Request:
    """Build (and read the datasets of) one task, group or tag."""
    loaded = manager.load([run_name])
    tasks, groups, members = loaded["tasks"], loaded.get("groups", {}), loaded.get("group_map", {})
    if run_name not in groups:  # a task, or a tag: its tasks
        return _Request(name, list(tasks.values()), list(tasks), frozenset())
    order: list[str] = []

    def walk(group: str) -> None:
        order.append(group)
        for child in members.get(group, []):
            if child in members:
                walk(child)
            else:
                order.append(child)

    walk(run_name)
    return _Request(name, [groups[run_name]], order, frozenset(groups))


def _load_request(name: str, source: str, *, offline_dir: Path | None, include: Path | None) -> tuple[_Request, object]:
    """(`_Request`, its TaskManager) for `name` from `source` ("include", "twin" or "stock")."""
    if source == "twin":
        manager = _task_manager(offline_dir)
        return _built(manager, name, OFFLINE_TASK_NAMES[name]), manager
    if source == "include":
        for with_defaults in (False, True):
            manager = _include_manager(include, with_defaults)
            try:
                return _built(manager, name, name), manager
            except DataError:
                raise
            except Exception as exc:
                if isinstance(exc, KeyError) and not with_defaults:
                    continue  # it names stock tasks (a group listing them): index those too, as lm-eval does
                raise DataError(f"zero-shot: task {name!r} of {include} cannot be loaded ({_first_line(exc)})") from exc
    manager = _stock_task_manager()
    try:
        return _built(manager, name, name), manager
    except DataError:
        raise
    except Exception as exc:
        raise _stock_failure(name, manager, exc) from exc


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


def _sources(names: list[str], include_names: frozenset[str], data_dir) -> tuple[dict[str, str], Path | None]:
    """Where each name comes from ("include", "twin" or "stock"), and the offline data folder of the twins."""
    twins = [n for n in names if n in TASKS and n not in include_names]
    offline_dir = _offline_dir(twins, data_dir) if twins else None
    return {n: "include" if n in include_names else "twin" if n in twins and offline_dir is not None else "stock"
            for n in names}, offline_dir


def _scalar(value) -> float | None:
    import numbers

    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def _rows(out: dict, request: _Request, report_as: dict[str, str]) -> list[ZeroShotResult]:
    """One `ZeroShotResult` per (result name, metric with filter) lm-eval reports for `request`."""
    rows = []
    for name in request.results:
        metrics = out["results"].get(name, {})
        n_docs = out.get("n-samples", {}).get(name, {}).get("effective", metrics.get("sample_len", 0))
        counts = metrics.get("sample_count") or {}  # a group: documents behind each aggregate
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or _scalar(value) is None:
                continue  # "alias", "sample_len", stderr keys, non-scalar metrics
            rows.append(ZeroShotResult(
                task=report_as.get(name, name),
                metric=metric if filter_name == "none" else key,
                value=_scalar(value),
                stderr=_number(metrics.get(f"{metric}_stderr,{filter_name}")),
                n_docs=int(counts.get(key, n_docs) or 0),
                request=request.name,
            ))
            logger.info("%s %s = %.4f ± %.4f (n=%d)", rows[-1].task, rows[-1].metric, rows[-1].value,
                        rows[-1].stderr, rows[-1].n_docs)
    return rows


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
    num_fewshot: int = 0,
    include_path: Path | str | None = None,
) -> list[ZeroShotResult]:
    """Score `model` on lm-eval `tasks`; one result per (task, metric with its filter).

    Args:
        model: a transformers causal LM (moved to `device` in place if it is elsewhere).
        tokenizer: its tokenizer.
        tasks: lm-eval task, group or tag names (order kept, duplicates dropped): the names
            `include_path` defines, the seven `TASKS` (offline with a data folder), any stock name.
        data_dir: local data root (`<data_dir>/zeroshot/<task>/...`, or the zeroshot folder itself)
            for the seven offline twins. None: env NEUROAL_DATA_DIR if it holds their files, else
            the stock tasks from the HF hub.
        limit: score only the first `limit` documents of each task (smoke tests).
        batch_size: requests per forward pass (None: chosen for the device, `default_batch_size`).
        device: torch device for the forward passes.
        packed: score a context once with all its continuations (`PackedHFLM`); False runs stock
            lm-eval `HFLM` unchanged (the reference the packed path is tested against).
        num_fewshot: examples in each prompt, as `lm_eval --num_fewshot` (a task whose YAML sets
            `num_fewshot: 0` stays zero-shot). 0 (the default) also overrides a YAML's own default.
            The offline twins take 0 only (their local files hold no training split).
        include_path: a folder of the user's task YAMLs (lm-eval's `--include_path`).

    Returns:
        `ZeroShotResult`s in request order; per task lm-eval's metric order (`acc` then `acc_norm`
        for the seven); a group's own rows before its members'.

    Raises:
        SpecError: unknown task, bad `limit` / `batch_size` / `num_fewshot` / `include_path`.
        DataError: a local file is missing or malformed, a task cannot be loaded, a stock task's
            data cannot be fetched (the message says how to get it), or few-shot of an offline twin.
    """
    names = check_tasks(tasks, include_path)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpecError("limit", limit, "a positive integer or None")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError("batch_size", batch_size, "a positive integer")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise SpecError("num_fewshot", num_fewshot, "a non-negative integer")
    include = _as_folder(include_path, "include_path") if include_path else None
    include_names = _folder_index(include)[0] if include else frozenset()
    sources, offline_dir = _sources(names, include_names, data_dir)
    twins = [n for n in names if sources[n] == "twin"]
    if num_fewshot and twins:  # stock lm-eval draws the examples from splits the local files lack
        raise DataError(
            f"zero-shot: --num-fewshot {num_fewshot} with the offline {twins[0]!r}: stock lm-eval draws its "
            f"examples from the stock training split, which the local files lack; run it with the hub reachable "
            f"(no --data-dir), or write a task YAML with a train split over local files and pass --zeroshot-include DIR"
        )
    logger.info(
        "%d-shot eval of %s%s%s",
        num_fewshot,
        ", ".join(f"{n} ({sources[n]})" for n in names),
        f", data {offline_dir}" if offline_dir is not None else "",
        f", limit {limit}" if limit else "",
    )

    import lm_eval

    with _quiet():
        requests, managers = [], []
        for name in names:
            request, manager = _load_request(name, sources[name], offline_dir=offline_dir, include=include)
            requests.append(request)
            managers.append(manager)
        lm = _make_lm(model, tokenizer, batch_size, device, packed)
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[obj for r in requests for obj in r.objects],
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
                device=device,
                log_samples=False,
                task_manager=managers[0],  # the objects are built: no name is looked up again
            )
        except ValueError as exc:
            if "Duplicate task" not in str(exc):
                raise
            raise SpecError("tasks", names, f"names that do not share a task ({exc})") from None
    if out is None:  # not rank 0 of a distributed run
        return []
    report_as = {OFFLINE_TASK_NAMES[n]: n for n in names if sources[n] == "twin"}
    return [row for request in requests for row in _rows(out, request, report_as)]


def count_docs(task: str, data_dir: Path | str | None = None) -> int:
    """Number of evaluation documents the offline twin of `task` yields from `data_dir`.

    Loads the task through lm-eval exactly as `evaluate_zeroshot` does (YAML + hook), no model.
    """
    name = _check_twin(task)
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR)
    if not data_dir:
        raise DataError(f"zero-shot data: no data folder given; pass data_dir or set {ENV_DATA_DIR}")
    _check_files([name], data_dir)
    with _quiet():
        request = _built(_task_manager(Path(data_dir)), name, OFFLINE_TASK_NAMES[name])
    return len(request.objects[0].eval_docs)
