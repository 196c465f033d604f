"""Calibration windows and perplexity token streams, from the hub or a local data folder.

Protocol (DESIGN §5, as the SparseGPT/Wanda/NeuroAL data code):
- calibration: `nsamples` windows of `seqlen` tokens; for each, draw a random document (Python
  `random`, seeded once) until one has more than `seqlen` tokens, then a random window of it. With
  seed 0 the first 8 windows of 128 are exactly the 8-window set the NeuroAL search uses.
- perplexity: WikiText-2 test rows joined by "\\n\\n"; C4 validation, first 1100 documents joined by
  " " and truncated to 256·seqlen tokens; PTB test sentences joined by " ".

Hub names resolve through `datasets` when no data folder is given. With `--data-dir` /
`NEUROAL_DATA_DIR`, the same names resolve from a folder laid out like `shared/data`:
`wikitext2/wiki.{test,valid,train}.raw`, `c4/*.json[l][.gz]`, `ptb/ptb.{test,train}.txt`.
Any user file works too: `.txt` (one document), `.jsonl`/`.json[.gz]` (a `text` field per line),
`.parquet` (a `text` column); for calibration, a file of ready token ids (`.pt`, `.npy`, or a Parquet
`input_ids` column) of shape [n, seqlen] is used as-is.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from neuroal.errors import DataError, SpecError

logger = logging.getLogger(__name__)

DATA_ENV = "NEUROAL_DATA_DIR"
DATASETS = ("wikitext2", "c4", "ptb")
DATA_VERSION = "2"  # bump when the protocol below changes; recorded with every result (2: offline C4 split by hash)
VALIDATION_MOD = 10
C4_VAL_DOCS = 1100
C4_VAL_WINDOWS = 256


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """`--data-dir` if given, else `NEUROAL_DATA_DIR`, else None (use the hub)."""
    value = explicit if explicit is not None else os.environ.get(DATA_ENV)
    if value in (None, ""):
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data-dir: {str(path)!r} is not a folder")
    return path


@dataclass(frozen=True)
class Documents:
    """Documents of one dataset split and where they came from (recorded in run.json)."""

    docs: list[str]
    origin: str


# ---------------------------------------------------------------- reading


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _read_json_docs(path: Path) -> list[str]:
    docs = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"data: {path}:{lineno} is not a JSON line with a 'text' field") from exc
    return docs


def _read_parquet_docs(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"data: {path} has no 'text' column (columns: {', '.join(table.column_names)})")
    return [str(x) for x in table.column("text").to_pylist()]


def read_file_docs(path: Path) -> list[str]:
    """Documents of a user file by extension (.txt one document; .jsonl/.json[.gz]; .parquet)."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data: {str(path)!r} {what}; allowed: {', '.join(DATASETS)} or a .txt/.jsonl/.parquet file")
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            return _read_json_docs(path)
        if name.endswith(".parquet"):
            return _read_parquet_docs(path)
        if name.endswith((".txt", ".raw", ".txt.gz")):
            with _open_text(path) as f:
                return [f.read()]
    except UnicodeDecodeError as exc:
        raise DataError(f"data: {path} is not UTF-8 text") from exc
    raise DataError(f"data: {path} has an unknown extension; allowed: .txt, .jsonl, .json[.gz], .parquet")


def _wikitext_rows(path: Path) -> list[str]:
    # Universal-newline reading gives the rows the HF `wikitext-2-raw-v1` loader yields, except that
    # it turns the blank lines (a single space) into "" (verified in shared/data/SOURCES.md).
    with open(path, encoding="utf-8") as f:
        return ["" if not line.strip() else line for line in f]


def _local_docs(name: str, split: str, root: Path) -> Documents:
    if name == "wikitext2":
        file = root / "wikitext2" / {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}[split]
        if not file.exists():
            raise DataError(f"data: wikitext2 {split} needs {file}, which does not exist")
        return Documents(_wikitext_rows(file), str(file))
    if name == "ptb":
        file = root / "ptb" / {"test": "ptb.test.txt", "validation": "ptb.valid.txt", "train": "ptb.train.txt"}[split]
        if not file.exists():
            raise DataError(f"data: ptb {split} needs {file}, which does not exist")
        with open(file, encoding="utf-8") as f:
            return Documents([line.rstrip("\n") for line in f], str(file))
    if name == "c4":
        folder = root / "c4"
        files = sorted(p for p in folder.glob("*") if p.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")))
        if not files:
            raise DataError(f"data: c4 needs JSON-lines files in {folder}, found none")
        tag = "train" if split == "train" else "validation"
        tagged = [p for p in files if tag in p.name]
        if tagged:
            return Documents([d for p in tagged for d in _read_json_docs(p)], ",".join(str(p) for p in tagged))
        return _hash_split([d for p in files for d in _read_json_docs(p)], split, ",".join(str(p) for p in files))
    raise AssertionError(name)


def in_validation(text: str) -> bool:
    """The documented split of an unsplit local corpus: a document is validation when the first 8 hex
    digits of the SHA-256 of its UTF-8 text, as an integer, are 0 mod 10 (~10%), else train.

    Deterministic, independent of file order and of which other documents are present, so calibration
    and evaluation are disjoint on any copy of the data.

    >>> in_validation("a"), in_validation("b")
    (True, False)
    """
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % VALIDATION_MOD == 0


def _hash_split(docs: list[str], split: str, files: str) -> Documents:
    keep = [i for i, d in enumerate(docs) if in_validation(d) == (split != "train")]
    n_val = sum(in_validation(d) for d in docs)
    origin = (f"{files} (no named {split} split: documents split by SHA-256 of the text, 1 in {VALIDATION_MOD} to "
              f"validation; {split}: {len(keep)} of {len(docs)} documents, indices {_ranges(keep)})")
    logger.info("c4: %d train / %d validation documents by hash", len(docs) - n_val, n_val)
    return Documents([docs[i] for i in keep], origin)


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (which documents, compactly, for run.json)."""
    out, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def _hub_docs(name: str, split: str) -> Documents:
    import datasets

    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return Documents(list(ds["text"]), f"hub:wikitext/wikitext-2-raw-v1:{split}")
        if name == "c4":
            files = {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }
            ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
            return Documents(list(ds["text"]), f"hub:allenai/c4:{files[split]}")
        if name == "ptb":
            ds = datasets.load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split)
            return Documents(list(ds["sentence"]), f"hub:ptb_text_only:{split}")
    except Exception as exc:
        raise DataError(
            f"data: cannot load {name} {split} from the hub ({type(exc).__name__}); "
            f"offline, pass --data-dir or set {DATA_ENV} to a local data folder"
        ) from exc
    raise AssertionError(name)


def load_documents(name: str, split: str, data_dir: Path | None) -> Documents:
    """Documents of a named dataset split, or of a user file (then `split` is ignored)."""
    if name in DATASETS:
        return _local_docs(name, split, data_dir) if data_dir is not None else _hub_docs(name, split)
    path = Path(name).expanduser()
    if path.suffix or path.exists():
        return Documents(read_file_docs(path), str(path))
    raise SpecError("dataset", name, list(DATASETS) + ["a .txt/.jsonl/.parquet file"])


# ---------------------------------------------------------------- perplexity


def perplexity_text(name: str, data_dir: Path | None) -> tuple[str, str]:
    """The text a perplexity is computed on (before tokenizing), and its origin."""
    if name == "wikitext2":
        docs = load_documents(name, "test", data_dir)
        return "\n\n".join(docs.docs), docs.origin
    if name == "c4":
        docs = load_documents(name, "validation", data_dir)
        return " ".join(docs.docs[:C4_VAL_DOCS]), docs.origin
    docs = load_documents(name, "test", data_dir)
    return (" " if name == "ptb" else "\n\n").join(docs.docs), docs.origin


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def tokenizer_digest(folder: Path) -> str | None:
    """A digest of the tokenizer files in a checkpoint folder and of the tokenizer libraries'
    versions: what a token stream depends on besides its text. None when there are no such files."""
    import tokenizers
    import transformers

    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not files:
        return None
    h = hashlib.sha256(f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}".encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class TokenCache:
    """Tokenized evaluation streams on disk (`.npy`, read without pickle), keyed by the text's and
    the tokenizer's digests: a one-off `neuroal eval` does not tokenize the same test file again.
    A damaged or foreign file is a miss, and is overwritten."""

    root: Path
    tokenizer: str  # `tokenizer_digest`

    def path(self, text: str) -> Path:
        key = hashlib.sha256(self.tokenizer.encode() + hashlib.sha256(text.encode()).digest()).hexdigest()
        return self.root / f"{key[:32]}.npy"

    def get(self, text: str) -> Tensor | None:
        try:
            ids = np.load(self.path(text), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if ids.ndim != 1 or ids.dtype != np.int64:
            return None
        return torch.from_numpy(ids)

    def put(self, text: str, ids: Tensor) -> None:
        from neuroal.fileio import atomic_path

        try:
            with atomic_path(self.path(text)) as tmp, open(tmp, "wb") as f:
                np.save(f, ids.numpy(), allow_pickle=False)
        except OSError as exc:  # a read-only home: no cache, same result
            logger.debug("token cache not written: %s", exc)


def perplexity_tokens(name: str, tokenizer, seqlen: int, data_dir: Path | None, *,
                      cache: TokenCache | None = None) -> tuple[Tensor, str]:
    """The token stream [N] a perplexity is computed on, and its origin.

    `tokenizer` is a tokenizer or a function returning one (called only when `cache` misses).
    """
    text, origin = perplexity_text(name, data_dir)
    ids = cache.get(text) if cache is not None else None
    if ids is None:
        tok = tokenizer() if callable(tokenizer) and not hasattr(tokenizer, "encode") else tokenizer
        ids = torch.tensor(tok(text).input_ids, dtype=torch.long)
        if cache is not None:
            cache.put(text, ids)
    if name == "c4":
        ids = ids[: C4_VAL_WINDOWS * seqlen]
    if ids.numel() < seqlen:
        raise DataError(f"data: {name} has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    return ids, origin


def perplexity_windows(ids: Tensor, seqlen: int) -> Tensor:
    """Non-overlapping [n, seqlen] windows of a token stream (the remainder is dropped)."""
    n = ids.numel() // seqlen
    return ids[: n * seqlen].reshape(n, seqlen)


# ---------------------------------------------------------------- calibration


def _load_ready(path: Path, name: str):
    """The raw content of a ready-ids file; anything unreadable (a damaged file, a pickle of
    objects, an object array) is a `DataError`: nothing in it is executed."""
    try:
        if name.endswith(".pt"):
            with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        if name.endswith(".npy"):
            return torch.from_numpy(np.load(path, allow_pickle=False))
        import pyarrow.parquet as pq

        if "input_ids" not in pq.read_schema(path).names:
            return None
        return torch.tensor(pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist())
    except Exception as exc:
        why = ("it holds pickled objects that are not tensors, which are never loaded (a pickle can run code)"
               if isinstance(exc, pickle.UnpicklingError) else f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
        raise DataError(f"calibration: {path} is not a readable file of token ids ({why}); "
                        "save an integer tensor [n, seqlen] with torch.save, numpy.save or a Parquet input_ids column"
                        ) from None


def _ready_ids(path: Path, vocab_size: int | None = None) -> Tensor | None:
    """Token ids stored ready-made ([n, seqlen]), or None if the file holds text.

    Raises:
        DataError: the file is unreadable, not an integer matrix, or holds ids outside [0, vocab_size).
    """
    name = path.name.lower()
    if not name.endswith((".pt", ".npy", ".parquet")):
        return None
    t = _load_ready(path, name)
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        what = (f"a {t.dim()}-d {str(t.dtype).removeprefix('torch.')} tensor" if isinstance(t, Tensor)
                else f"a {type(t).__name__}")
        raise DataError(f"calibration: {path} holds {what}; allowed: integer token ids of shape [n, seqlen]")
    t = t.long()
    if vocab_size is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise DataError(f"calibration: {path} holds token ids from {int(t.min())} to {int(t.max())}; allowed: "
                        f"0..{vocab_size - 1} (the tokenizer's vocabulary of {vocab_size})")
    return t


def _check_supply(docs: Documents, tokenizer, nsamples: int, seqlen: int, source: str, cache: dict) -> None:
    """Refuse, up front, more windows than the data holds without overlap (they would repeat text).

    Tokenizes documents in order (into `cache`, which the sampling reuses) only until enough windows
    are found, so a large corpus costs a few documents.
    """
    available = 0
    for i, doc in enumerate(docs.docs):
        if i not in cache:
            cache[i] = tokenizer(doc).input_ids
        if len(cache[i]) > seqlen:
            available += len(cache[i]) // seqlen
        if available >= nsamples:
            return
    if available == 0:
        return  # the sampling loop says which document is the longest
    name = source if source in DATASETS else Path(source).name
    raise SpecError("--nsamples", nsamples, f"at most {available} with --seqlen {seqlen}: the {name} calibration "
                    f"data ({len(docs.docs)} documents) holds {available} non-overlapping windows of {seqlen} "
                    "tokens; lower --nsamples or --seqlen, or give a larger dataset")


def calibration_windows(
    source: str,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    data_dir: Path | None,
) -> tuple[Tensor, str]:
    """`nsamples` calibration windows [nsamples, seqlen] and their origin.

    Raises:
        DataError: missing data, no document longer than `seqlen`, or a ready-ids file whose shape
            does not match `--nsamples`/`--seqlen`.
    """
    path = Path(source).expanduser()
    if source not in DATASETS and path.suffix:
        if not path.is_file():
            raise DataError(f"calibration: file {str(path)!r} does not exist")
        ready = _ready_ids(path, len(tokenizer))
        if ready is not None:
            if ready.shape[1] != seqlen or ready.shape[0] < nsamples:
                raise DataError(
                    f"calibration: {path} holds token ids of shape {tuple(ready.shape)}; "
                    f"need at least [--nsamples {nsamples}, --seqlen {seqlen}]"
                )
            return ready[:nsamples].clone(), f"{path} (ready token ids)"
    docs = load_documents(source, "train", data_dir)
    if not docs.docs:
        raise DataError(f"calibration: {docs.origin} has no documents")
    cache: dict[int, list[int]] = {}
    _check_supply(docs, tokenizer, nsamples, seqlen, source, cache)
    rng = random.Random(seed)
    too_short: set[int] = set()
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs.docs) - 1)
            if i not in cache:
                cache[i] = tokenizer(docs.docs[i]).input_ids
            ids = cache[i]
            if len(ids) > seqlen:
                break
            too_short.add(i)
            if len(too_short) == len(docs.docs):
                longest = max(len(v) for v in cache.values())
                raise DataError(
                    f"calibration: no document in {docs.origin} is longer than --seqlen {seqlen} tokens "
                    f"(longest: {longest}); lower --seqlen or give a larger dataset"
                )
        j = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[j : j + seqlen])
    return torch.tensor(windows, dtype=torch.long), docs.origin
