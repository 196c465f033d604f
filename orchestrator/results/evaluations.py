"""Evaluations as records: each with its `eval_key` and its protocol in words, what a run lacks, and how
new ones merge into a run.json (pure functions: the store, the report and reruns read them)."""

from __future__ import annotations

from neuroal.zeroshot import TaskFolder


def protocol(*, seqlen: int | None = None, windows: int | None = None, windows_available: int | None = None,
             limit: int | None = None, n_docs: int | None = None, num_fewshot: int = 0,
             dtype: str | None = None) -> str:
    """How an evaluation was made, in words (run.json, the store, the summary and the report).

    >>> protocol(seqlen=256, windows=16, windows_available=1234)
    'seqlen 256, 16 of 1234 windows'
    >>> protocol(limit=100, n_docs=100)
    '100 documents (--zeroshot-limit 100)'
    >>> protocol(n_docs=20, num_fewshot=2, dtype="bfloat16")
    '20 documents (all), 2-shot, bfloat16'
    """
    in_dtype = f", {dtype}" if dtype else ""
    if seqlen is not None:
        part = "all" if windows == windows_available else f"{windows} of"
        return f"seqlen {seqlen}, {part} {windows_available} windows" + in_dtype
    shots = f", {num_fewshot}-shot" if num_fewshot else ""
    return (f"{n_docs} documents" + (f" (--zeroshot-limit {limit})" if limit is not None else " (all)") + shots
            + in_dtype)


def perplexity_entry(name: str, value: float, info: dict) -> dict:
    """One perplexity evaluation as `run.json["evaluations"]` keeps it: value, its `eval_data` info
    (eval key, seqlen, windows, origin) and the protocol in words."""
    available = info.get("windows_available", info["windows"])
    return {"kind": "perplexity", "task": name, "metric": "perplexity", "value": value, "stderr": None,
            **info, "windows_available": available,
            "protocol": protocol(seqlen=info["seqlen"], windows=info["windows"], windows_available=available,
                                 dtype=info.get("dtype"))}


def zeroshot_entries(rows: list[dict], limit: int | None, *, num_fewshot: int = 0) -> list[dict]:
    """Keyed zero-shot rows as `run.json["evaluations"]` keeps them: with the limit, shots and protocol."""
    return [dict(r, kind="zeroshot", limit=limit, num_fewshot=num_fewshot,
                 protocol=protocol(limit=limit, n_docs=r.get("n_docs"), num_fewshot=num_fewshot,
                                   dtype=r.get("dtype"))) for r in rows]


def zeroshot_key(name: str, limit: int | None, *, num_fewshot: int = 0, include: TaskFolder | None = None,
                 dtype: str | None = None) -> str:
    """The eval key of zero-shot task (or group) `name`: its limit, shots, compute dtype, and, for a
    task of the user's folder, the digest of that folder's definitions."""
    from orchestrator.spec import eval_key

    definitions = include.digest if include is not None and name in include.names else None
    return eval_key("zeroshot", name, limit=limit, num_fewshot=num_fewshot, definitions=definitions, dtype=dtype)


def keyed_zeroshot(rows: list[dict], limit: int | None, *, num_fewshot: int = 0,
                   include: TaskFolder | None = None) -> list[dict]:
    """Zero-shot rows with their `eval_key` (the store never mixes evaluations made differently).

    A row is keyed by the name asked for (`request`: a group's subtasks carry the group's key), so
    whether a requested name was evaluated is one key lookup; a task asked by name keeps the key it
    always had.
    """
    return [dict(r, eval_key=zeroshot_key(r.get("request", r["task"]), limit, num_fewshot=num_fewshot,
                                          include=include, dtype=r.get("dtype"))) for r in rows]


def recorded(run: dict) -> list[dict]:
    """Every evaluation a run.json holds (a run.json written before `evaluations` existed: its
    headline results, which were all it kept)."""
    if "evaluations" in run:
        return list(run["evaluations"])
    data = run.get("eval_data", {})
    entries = [perplexity_entry(n, v, data[n]) for n, v in run.get("perplexity", {}).items() if "eval_key" in data.get(n, {})]
    return entries + [dict(r, kind="zeroshot", protocol=f"{r.get('n_docs')} documents") for r in run.get("zeroshot", [])]


def missing(run: dict, *, perplexity_sets, seqlen, windows, zeroshot_tasks, limit, num_fewshot: int = 0,
            include: TaskFolder | None = None, dtype: str | None = None) -> tuple[list, list]:
    """The requested evaluations a run.json does not hold yet (made the same way, in compute `dtype`)."""
    from orchestrator.spec import eval_key

    entries = recorded(run)
    have = {(e["task"], e["eval_key"]) for e in entries}
    zeroshot_keys = {e["eval_key"] for e in entries if e["kind"] == "zeroshot"}
    ppl = [n for n in perplexity_sets
           if (n, eval_key("perplexity", n, seqlen=seqlen, windows=windows, dtype=dtype)) not in have]
    zs = [t for t in zeroshot_tasks
          if zeroshot_key(t, limit, num_fewshot=num_fewshot, include=include, dtype=dtype) not in zeroshot_keys]
    return ppl, zs


_INFO = ("origin", "windows", "windows_available", "tokens", "seqlen", "dtype", "eval_key")  # eval_data's fields


def _scored(entry: dict) -> int:
    """How much an evaluation scored: tokens for perplexity, documents for zero-shot."""
    if entry["kind"] == "perplexity":
        return entry["seqlen"] * entry["windows"]
    return entry.get("n_docs") or 0


def merge(run: dict, new: dict) -> dict:
    """`run` with the new evaluations added to `evaluations` (one per eval key, task and metric).

    The headline results (`perplexity`, `eval_data`, `zeroshot`) are, per dataset or task, the
    fullest evaluation on record (most tokens or documents scored; the newer on a tie): a quick
    look with fewer windows is kept beside the full one, never in its place.
    """
    ident = lambda e: (e["eval_key"], e["task"], e["metric"])  # noqa: E731
    fresh = {ident(e) for e in new["evaluations"]}
    entries = [e for e in recorded(run) if ident(e) not in fresh] + list(new["evaluations"])
    best: dict[tuple[str, str], dict] = {}
    for e in entries:  # later entries are newer: >= lets them win a tie
        key = (e["kind"], e["task"])
        if key not in best or _scored(e) >= _scored(best[key]):
            best[key] = e
    out = dict(run, evaluations=entries)
    ppl = {task: e for (kind, task), e in best.items() if kind == "perplexity"}
    out["perplexity"] = {task: e["value"] for task, e in ppl.items()}
    out["eval_data"] = {task: {k: v for k, v in e.items() if k in _INFO} for task, e in ppl.items()}
    keys = {task: e["eval_key"] for (kind, task), e in best.items() if kind == "zeroshot"}
    out["zeroshot"] = [{k: v for k, v in e.items() if k not in ("kind", "limit", "num_fewshot", "protocol")} for e in entries
                       if e["kind"] == "zeroshot" and keys.get(e["task"]) == e["eval_key"]]
    return out
