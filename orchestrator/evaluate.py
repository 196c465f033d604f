"""Evaluation where the model is: perplexity streamed through the shard chain, zero-shot via lm-eval."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from neuroal.data import perplexity_tokens, perplexity_windows
from orchestrator.session import Session
from orchestrator.shard import Shard
from orchestrator.tasks import Forward

logger = logging.getLogger(__name__)


def perplexity(
    session: Session, name: str, seqlen: int, data_dir, *, batch: int = 4, max_windows: int | None = None
) -> tuple[float, dict]:
    """exp(mean NLL) over non-overlapping windows of the dataset's test stream (papers' protocol).

    `max_windows` keeps only the first windows (a quick estimate, recorded as such).
    """
    ids, origin = perplexity_tokens(name, session.tokenizer, seqlen, data_dir)
    windows = perplexity_windows(ids, seqlen)
    all_windows = windows.shape[0]
    if max_windows is not None:
        windows = windows[:max_windows]
    session.ensure_kwargs(seqlen)
    chain = session.chain
    last = chain.n_shards - 1
    pending = []
    for i in range(0, windows.shape[0], batch):
        chunk = windows[i : i + batch]
        hidden = chain.call(0, Shard.embed, chunk)
        for k in range(chain.n_shards):
            hidden, _ = chain.call(k, Shard.run, Forward(), hidden, 0.0)
        pending.append(chain.call(last, Shard.nll, hidden, chunk))
    total = sum(chain.get(h)[0] for h in pending)
    n = windows.shape[0]
    return math.exp(total / (n * seqlen)), {"origin": origin, "windows": n, "windows_available": all_windows,
                                            "tokens": int(ids.numel())}


def zeroshot(folder: Path, tasks, data_dir, limit) -> list[dict]:
    """lm-eval zero-shot tasks on a saved checkpoint (loaded the way users load it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroal.zeroshot import evaluate_zeroshot

    model = AutoModelForCausalLM.from_pretrained(folder)
    results = evaluate_zeroshot(model, AutoTokenizer.from_pretrained(folder), list(tasks), data_dir=data_dir, limit=limit)
    return [{"task": r.task, "metric": r.metric, "value": r.value, "stderr": r.stderr, "n_docs": r.n_docs}
            for r in results]
