"""Loaders for the offline zero-shot tasks (`!function` hooks of the YAMLs next to this file).

Each `load_<task>` is an lm-eval `custom_dataset` hook: lm-eval 0.4.x calls it with the task's
`metadata` (the TaskManager's metadata merged in) as keyword arguments. `data_dir` comes from there
(`TaskManager(metadata={"data_dir": ...})`, which `neuroal.zeroshot` sets), else from the environment
variable `NEUROAL_DATA_DIR`. Nothing is hard-coded to one machine's paths.

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

import csv
import gzip
import json
import os
import re
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


# ----------------------------------------------------------------------------- WinoGrande


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


# ----------------------------------------------------------------------------- HellaSwag

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


# ----------------------------------------------------------------------------- ARC

# the two ARC-Challenge test questions GenMC's copy lacks, keyed by a prefix of their stem
_ARC_MISSING_IDS = {
    "Which of the following actions will increase the gravitational force": "Mercury_412681",
    "A pitcher throws a 0.15 kg baseball": "MCAS_2006_9_43",
}


def _arc_doc(rec: dict, answer: str) -> dict:
    q = rec["question"]
    return {
        "id": rec["id"],
        "question": q["stem"],
        "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
        "answerKey": answer,
    }


def _load_arc(folder: Path, name: str) -> list[dict]:
    path, key_path = folder / name / "test.jsonl", folder / name / "test-answer-key.jsonl"
    recs = _read_jsonl(path)
    key = [(str(_field(key_path, i, r, "id")), str(_field(key_path, i, r, "answerKey"))) for i, r in enumerate(_read_jsonl(key_path))]
    by_id: dict[str, dict] = {}
    for i, rec in enumerate(recs):
        rid = _field(path, i, rec, "id")
        q = _field(path, i, rec, "question")
        if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
            raise DataError(f"zero-shot data: {path} record {i} is not in the AI2 ARC schema")
        by_id[rid] = rec
    missing = [qid for qid, _ in key if qid not in by_id]
    if missing:
        by_id.update(_arc_missing(folder / name / "test-missing2-llm-foundry.jsonl", missing))
    extra = set(by_id) - {qid for qid, _ in key}
    if extra:
        raise DataError(f"zero-shot data: {path} has questions not in {key_path}: {sorted(extra)[:5]}")
    docs = []
    for qid, answer in key:  # the official order
        rec = by_id[qid]
        if rec.get("answerKey", answer) != answer:
            raise DataError(f"zero-shot data: {qid}: answerKey {rec['answerKey']!r} in {path} vs {answer!r} in {key_path}")
        doc = _arc_doc(rec, answer)
        if answer not in doc["choices"]["label"]:
            raise DataError(f"zero-shot data: {qid}: answer {answer!r} is not a choice label")
        docs.append(doc)
    return docs


def _arc_missing(path: Path, ids: list[str]) -> dict[str, dict]:
    """Rebuild questions absent from the AI2 JSONL from llm-foundry's `{query, choices, gold}` lines.

    llm-foundry stores `query = "Question: " + stem` and the choice texts; labels are A, B, C, ...
    in order (both known missing questions have 4 lettered choices in ARC). The gold index is
    cross-checked against the official answer key by the caller. Deviation: the stem/choice texts are
    llm-foundry's copy, not the AI2 file (e.g. "at 43 40 m/s" is reproduced as stored there).
    """
    if not path.is_file():
        raise DataError(
            f"zero-shot data: missing file {path} (needed for {len(ids)} question(s) absent from test.jsonl: "
            f"{', '.join(ids)})"
        )
    found: dict[str, dict] = {}
    for i, rec in enumerate(_read_jsonl(path)):
        query = str(_field(path, i, rec, "query"))
        stem = query[len("Question: ") :] if query.startswith("Question: ") else query
        qid = next((v for k, v in _ARC_MISSING_IDS.items() if stem.startswith(k)), None)
        if qid is None or qid not in ids:
            continue
        choices = list(_field(path, i, rec, "choices"))
        labels = [chr(ord("A") + j) for j in range(len(choices))]
        gold = int(_field(path, i, rec, "gold"))
        found[qid] = {
            "id": qid,
            "question": {"stem": stem, "choices": [{"text": t, "label": lab} for t, lab in zip(choices, labels)]},
            "answerKey": labels[gold],
        }
    lacking = [qid for qid in ids if qid not in found]
    if lacking:
        raise DataError(f"zero-shot data: questions {lacking} are neither in test.jsonl nor in {path}")
    return found


def load_arc_easy(data_dir=None, **_):
    """ARC-Easy for the stock `arc_easy` task (`allenai/ai2_arc`, `ARC-Easy`, test split, 2376).

    Local files: the AI2 ARC JSONL (`id`, `question.stem`, `question.choices[].{text,label}`,
    `answerKey`; GenMC's extra `para` field ignored) mapped to the HF schema (`question` = stem,
    `choices = {text, label}`), in the order of the official `test-answer-key.jsonl`, every answerKey
    checked against that key. No known deviation.
    """
    return _dataset("test", _load_arc(resolve_zeroshot_dir(data_dir), "arc_easy"))


def load_arc_challenge(data_dir=None, **_):
    """ARC-Challenge for the stock `arc_challenge` task (`allenai/ai2_arc`, `ARC-Challenge`, test, 1172).

    As `load_arc_easy`. Deviation: the local AI2 JSONL has 1170 of the 1172 questions; the two absent
    ones (Mercury_412681, MCAS_2006_9_43; positions 60 and 89 in the official order) are rebuilt from
    `test-missing2-llm-foundry.jsonl` (see `_arc_missing`), their answers checked against the key.
    """
    return _dataset("test", _load_arc(resolve_zeroshot_dir(data_dir), "arc_challenge"))


# ----------------------------------------------------------------------------- OpenBookQA


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
