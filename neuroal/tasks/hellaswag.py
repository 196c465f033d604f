"""Hook for HellaSwag from its derived text file, with lm-eval's ctx_b capital restored (see `local_files`)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from neuroal.errors import DataError
from neuroal.tasks.local_files import _dataset, resolve_zeroshot_dir

_SENTENCE_END = re.compile(r"[.!?][\"')]* ")
_ENDS_SENTENCE = re.compile(r"[.!?][\"')]*$")


def restore_ctx_b_capital(query: str) -> str:
    """Redo lm-eval's `ctx_b.capitalize()`, which the derived HellaSwag file does not apply.

    lm-eval builds `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`. The local
    file has the same string with `ctx_b` as is (lower case) and no ctx_a/ctx_b split. In HellaSwag,
    ctx_b is non-empty for the ActivityNet items (an unfinished noun phrase after ctx_a's last
    sentence, e.g. "... on a roof. he") and empty for WikiHow items, whose context ends with a full
    sentence. Heuristic: if the text after the activity label does not end a sentence, its trailing
    fragment (after the last ". ", "! " or "? ") is taken to be ctx_b and `.capitalize()`d, exactly as
    lm-eval does (which also lower-cases the rest of ctx_b). In the validation file this separates
    3243 fragment-ended (ActivityNet-style) from 6799 sentence-ended (WikiHow-style) items; it is
    wrong only where ctx_b itself contains a sentence break (e.g. "mr. smith") or ctx_a does not end
    a sentence.
    """
    label, sep, body = query.partition(": ")
    if not sep or not body or _ENDS_SENTENCE.search(body):
        return query
    cuts = list(_SENTENCE_END.finditer(body))
    start = cuts[-1].end() if cuts else 0
    return f"{label}{sep}{body[:start]}{body[start:].capitalize()}"


def _hellaswag_text(folder: Path) -> tuple[Path, str]:
    gz = folder / "hellaswag/hellaswag_val_full.txt.gz"
    if gz.is_file():
        with gzip.open(gz, "rb") as f:
            return gz, f.read().decode("utf-8")
    txt = gz.with_suffix("")
    if txt.is_file():
        return txt, txt.read_text(encoding="utf-8")
    raise DataError(f"zero-shot data: missing file {gz}")


def load_hellaswag(data_dir=None, **_):
    """HellaSwag for the stock `hellaswag` task (`Rowan/hellaswag`, validation split, after the stock
    `utils.process_docs`), returned directly in the processed form `{query, choices, gold}` plus the
    raw `label` (string, as in the HF dataset; the stock `doc_to_target` is `{{label}}`) and
    `activity_label`.

    Local file: a **derived** text extraction of all 10,042 validation items (made for llama.cpp):
    6 lines per item - `activity_label: ctx`, the gold index, the 4 endings - with every string
    already cleaned of WikiHow tags. Deviations from stock (documented, not all fixable offline):
      * the extractor's tag cleanup (drop `[header]`/`[step]`/`[substeps]`, ` [title]` -> `. `, strip)
        is close to but not verified identical to lm-eval's `preprocess` on every item;
      * lm-eval capitalises `ctx_b`, the file does not; restored by `restore_ctx_b_capital`
        (a heuristic, see there); checked against the stock pipeline on the first validation items;
      * `ind`, `ctx_a`, `ctx_b`, `source_id`, `split_type` are absent (not used by the prompt);
      * the item order is the file's (it starts with the same items as the official val jsonl).
    """
    path, text = _hellaswag_text(resolve_zeroshot_dir(data_dir))
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"zero-shot data: {path} has {len(lines)} lines, not a multiple of 6")
    rows = []
    for k in range(0, len(lines), 6):
        query, label, *endings = lines[k : k + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"zero-shot data: {path} line {k + 2} should be a label 0-3, got {label!r}")
        act = query.partition(": ")[0]
        rows.append(
            {
                "activity_label": act,
                "query": restore_ctx_b_capital(query),
                "choices": endings,
                "gold": int(label),
                "label": label.strip(),
            }
        )
    return _dataset("validation", rows)
