"""Hook for OpenBookQA, its choices parsed back out of the official TSV (see `local_files`)."""

from __future__ import annotations

import csv

from neuroal.errors import DataError
from neuroal.tasks.local_files import _dataset, _need, resolve_zeroshot_dir


def _obqa_choices(text: str, labels=("A", "B", "C", "D")) -> list[str] | None:
    """Split "(A) x (B) y (C) z (D) w" into [x, y, z, w] (markers searched in order)."""
    first = f"({labels[0]}) "
    if not text.startswith(first):
        return None
    out, pos = [], len(first)
    for nxt in labels[1:]:
        cut = text.find(f" ({nxt}) ", pos)
        if cut < 0:
            return None
        out.append(text[pos:cut])
        pos = cut + len(f" ({nxt}) ")
    out.append(text[pos:])
    return out


def load_openbookqa(data_dir=None, **_):
    """OpenBookQA for the stock `openbookqa` task (`allenai/openbookqa`, `main`, test split, 500).

    Local file: the official `Data/Main/test.tsv` (`ID, Question Stem, Choices, Complete Question,
    Answer Key`; choices as `(A) .. (B) .. (C) .. (D) ..`), mapped to the HF schema (`id`,
    `question_stem`, `choices = {text, label}`, `answerKey`). Deviation: choice texts are parsed back
    out of the one-column rendering (a choice containing " (B) " etc. would split wrongly; none does
    in the test set, every row yields 4 choices whose rendering reproduces the column exactly).
    """
    path = _need(resolve_zeroshot_dir(data_dir) / "openbookqa/test.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        want = ["ID", "Question Stem", "Choices", "Complete Question", "Answer Key"]
        if header != want:
            raise DataError(f"zero-shot data: {path} header {header} is not {want}")
        rows = []
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != 5:
                raise DataError(f"zero-shot data: {path} line {lineno} has {len(row)} columns, not 5")
            qid, stem, choices, _, answer = row
            texts = _obqa_choices(choices)
            labels = ["A", "B", "C", "D"]
            if texts is None or " ".join(f"({lab}) {t}" for lab, t in zip(labels, texts)) != choices:
                raise DataError(f"zero-shot data: {path} line {lineno}: cannot split choices {choices!r}")
            if answer.strip() not in labels:
                raise DataError(f"zero-shot data: {path} line {lineno}: answer key {answer!r}")
            rows.append(
                {
                    "id": qid,
                    "question_stem": stem,
                    "choices": {"text": texts, "label": labels},
                    "answerKey": answer.strip(),
                }
            )
    return _dataset("test", rows)
