"""Hook for WinoGrande dev, checked item by item against its official labels (see `local_files`)."""

from __future__ import annotations

from neuroal.errors import DataError
from neuroal.tasks.local_files import _dataset, _field, _need, _read_jsonl, resolve_zeroshot_dir


def load_winogrande(data_dir=None, **_):
    """WinoGrande for the stock `winogrande` task (`allenai/winogrande`, `winogrande_xl`, validation).

    Local files: WinoGrande 1.1 `dev.jsonl` (= winogrande_xl validation, 1267 items; fields
    `sentence, option1, option2, answer` kept as strings, metadata dropped) and the official
    `dev-labels.lst`; the two must agree item by item (DataError otherwise). No known deviation.
    """
    folder = resolve_zeroshot_dir(data_dir)
    path, lab_path = folder / "winogrande/dev.jsonl", folder / "winogrande/dev-labels.lst"
    recs = _read_jsonl(path)
    labels = _need(lab_path).read_text(encoding="utf-8").split()
    if len(labels) != len(recs):
        raise DataError(f"zero-shot data: {lab_path} has {len(labels)} labels for {len(recs)} items in {path}")
    rows = []
    for i, (rec, lab) in enumerate(zip(recs, labels)):
        answer = str(rec.get("answer", lab))
        if answer != lab or lab not in ("1", "2"):
            raise DataError(f"zero-shot data: item {i}: {path} answer {answer!r} vs {lab_path} label {lab!r}")
        sentence = _field(path, i, rec, "sentence")
        if "_" not in sentence:
            raise DataError(f"zero-shot data: {path} record {i} has no '_' blank")
        rows.append(
            {
                "sentence": sentence,
                "option1": _field(path, i, rec, "option1"),
                "option2": _field(path, i, rec, "option2"),
                "answer": lab,
            }
        )
    return _dataset("validation", rows)
