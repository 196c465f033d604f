"""Where the offline zero-shot files live and how the task hooks read them.

The `load_<task>` hooks (one module per data source next to this file: `superglue`, `winogrande`,
`hellaswag`, `arc`, `openbookqa`) are lm-eval `custom_dataset` hooks: lm-eval 0.4.x calls them with
the task's `metadata` (the TaskManager's metadata merged in) as keyword arguments. `data_dir` comes
from there (`TaskManager(metadata={"data_dir": ...})`, which `neuroal.zeroshot` sets), else from the
environment variable `NEUROAL_DATA_DIR`. Nothing is hard-coded to one machine's paths.

`data_dir` is the data root (e.g. `/work/shared/data`, holding `zeroshot/<task>/...`) or the
`zeroshot` folder itself. Each hook reads the local files, converts every record to the *stock*
Hugging Face schema the stock lm-eval 0.4.13 task reads (same field names, types, order), and
returns `{split: datasets.Dataset}` under the stock split name. The YAMLs then apply the stock
`doc_to_text` / `doc_to_choice` / `doc_to_target` / metrics unchanged, so prompts match by
construction. Known deviations of the local data from the stock datasets are documented on each
loader (`DEVIATIONS` has a one-line summary per task).

Layout read (relative to `<data_dir>/zeroshot`):

    rte/val.jsonl                               SuperGLUE RTE val (premise, hypothesis, label, idx)
    boolq/superglue_val.jsonl                   SuperGLUE BoolQ val (question, passage, idx, label)
    winogrande/dev.jsonl, dev-labels.lst        WinoGrande dev (= winogrande_xl validation) + labels
    hellaswag/hellaswag_val_full.txt.gz         derived 6-lines-per-item text (.txt also accepted)
    arc_easy/test.jsonl, test-answer-key.jsonl  AI2 ARC JSONL (+ official answer key and order)
    arc_challenge/test.jsonl, test-answer-key.jsonl, test-missing2-llm-foundry.jsonl
    openbookqa/test.tsv                         official OpenBookQA Main/test.tsv

Raises `neuroal.errors.DataError` naming the path for a missing or malformed file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from neuroal.errors import DataError

ENV_DATA_DIR = "NEUROAL_DATA_DIR"

# stock task name -> (offline task name, stock split name the docs are returned under)
LOCAL_TASKS: dict[str, tuple[str, str]] = {
    "rte": ("rte_local", "validation"),
    "winogrande": ("winogrande_local", "validation"),
    "boolq": ("boolq_local", "validation"),
    "hellaswag": ("hellaswag_local", "validation"),
    "arc_easy": ("arc_easy_local", "test"),
    "arc_challenge": ("arc_challenge_local", "test"),
    "openbookqa": ("openbookqa_local", "test"),
}

# files that must exist for each task (relative to the zeroshot folder); checked up front
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "rte": ("rte/val.jsonl",),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "boolq": ("boolq/superglue_val.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.gz",),
    "arc_easy": ("arc_easy/test.jsonl", "arc_easy/test-answer-key.jsonl"),
    "arc_challenge": ("arc_challenge/test.jsonl", "arc_challenge/test-answer-key.jsonl"),
    "openbookqa": ("openbookqa/test.tsv",),
}

DEVIATIONS: dict[str, str] = {
    "rte": "SuperGLUE RTE val renamed to the GLUE schema the stock `rte` (glue/rte) reads; "
    "same 277 pairs and labels (GLUE RTE dev = SuperGLUE RTE val), assumed same order.",
    "winogrande": "none known (WinoGrande 1.1 dev = winogrande_xl validation; labels checked "
    "against dev-labels.lst).",
    "boolq": "none known (SuperGLUE val; string labels 'true'/'false' mapped to the ClassLabel ints).",
    "hellaswag": "derived text file: the extractor's tag cleanup approximates lm-eval's "
    "preprocess; ctx_b capitalisation (lost in the file) is restored by a heuristic; ind/ctx_a/"
    "ctx_b/source_id absent.",
    "arc_easy": "none known (AI2 JSONL; questions ordered and answers checked by the official key).",
    "arc_challenge": "1170 AI2 JSONL questions + 2 (Mercury_412681, MCAS_2006_9_43) rebuilt from "
    "llm-foundry's copy (text as llm-foundry stores it).",
    "openbookqa": "choices parsed back out of the TSV's '(A) .. (B) ..' column.",
}


# ----------------------------------------------------------------------------- paths


def resolve_zeroshot_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding `<task>/...`: `data_dir/zeroshot` if it exists, else `data_dir` itself.

    `data_dir=None` falls back to the environment variable NEUROAL_DATA_DIR.
    """
    if data_dir is None or data_dir == "":
        data_dir = os.environ.get(ENV_DATA_DIR) or None
    if data_dir is None:
        raise DataError(
            f"zero-shot data: no data folder given; pass data_dir (--data-dir) or set {ENV_DATA_DIR}"
        )
    root = Path(data_dir).expanduser()
    return root / "zeroshot" if (root / "zeroshot").is_dir() else root


def missing_files(task: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The required local files of `task` that do not exist (empty list: all present)."""
    folder = resolve_zeroshot_dir(data_dir)
    return [folder / rel for rel in REQUIRED_FILES[task] if not _exists(folder / rel, task)]


def _exists(path: Path, task: str) -> bool:
    if path.is_file():
        return True
    # HellaSwag: an uncompressed copy is accepted too
    return task == "hellaswag" and path.with_suffix("").is_file()


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"zero-shot data: missing file {path}")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(_need(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"zero-shot data: {path} line {lineno} is not JSON ({exc})") from exc
    return out


def _dataset(split: str, rows: list[dict]):
    import datasets

    return {split: datasets.Dataset.from_list(rows)}


def _field(path: Path, i: int, rec: dict, key: str):
    try:
        return rec[key]
    except (KeyError, TypeError):
        raise DataError(f"zero-shot data: {path} record {i} has no field {key!r}") from None
