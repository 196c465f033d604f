"""Hooks for the two SuperGLUE validation files: RTE (served in GLUE's schema) and BoolQ (see `local_files`)."""

from __future__ import annotations

from neuroal.errors import DataError
from neuroal.tasks.local_files import _dataset, _field, _read_jsonl, resolve_zeroshot_dir


# ----------------------------------------------------------------------------- RTE


def load_rte(data_dir=None, **_):
    """RTE for the stock `rte` task, which in lm-eval 0.4.13 is **GLUE** RTE (`nyu-mll/glue`, `rte`,
    validation split; `sglue_rte` is the SuperGLUE one; both use the same prompt).

    Local file: SuperGLUE RTE val (`premise, hypothesis, label, idx`, string labels). GLUE RTE dev and
    SuperGLUE RTE val are the same 277 pairs (RTE1-3,5 dev; both start with the "Dana Reeve" pair);
    fields are renamed to GLUE's `sentence1, sentence2, label, idx` and `label` mapped to the shared
    ClassLabel ints (0 = entailment, 1 = not_entailment). Deviation: the item order is assumed (not
    checked offline) to equal GLUE's.
    """
    path = resolve_zeroshot_dir(data_dir) / "rte/val.jsonl"
    labels = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}
    rows = []
    for i, rec in enumerate(_read_jsonl(path)):
        lab = _field(path, i, rec, "label")
        if lab not in labels:
            raise DataError(f"zero-shot data: {path} record {i} has label {lab!r}")
        rows.append(
            {
                "sentence1": _field(path, i, rec, "premise"),
                "sentence2": _field(path, i, rec, "hypothesis"),
                "label": labels[lab],
                "idx": int(rec.get("idx", i)),
            }
        )
    return _dataset("validation", rows)


# ----------------------------------------------------------------------------- BoolQ


def load_boolq(data_dir=None, **_):
    """BoolQ for the stock `boolq` task (`aps/super_glue`, `boolq`, validation split).

    Local file: the SuperGLUE BoolQ val jsonl (`question, passage, idx, label`; passage already
    `title -- passage` as in SuperGLUE). Only change: the string labels `"false"/"true"` become the
    ClassLabel ints 0/1 (names `["False", "True"]`). No known deviation.
    """
    path = resolve_zeroshot_dir(data_dir) / "boolq/superglue_val.jsonl"
    labels = {"false": 0, "true": 1, False: 0, True: 1, 0: 0, 1: 1}
    rows = []
    for i, rec in enumerate(_read_jsonl(path)):
        lab = _field(path, i, rec, "label")
        key = lab.lower() if isinstance(lab, str) else lab
        if key not in labels:
            raise DataError(f"zero-shot data: {path} record {i} has label {lab!r}")
        rows.append(
            {
                "question": _field(path, i, rec, "question"),
                "passage": _field(path, i, rec, "passage"),
                "idx": int(rec.get("idx", i)),
                "label": labels[key],
            }
        )
    return _dataset("validation", rows)
