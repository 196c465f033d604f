"""Perplexity streamed through the chain of shards (the papers' protocol: non-overlapping windows of the
test stream, exp of the mean next-token NLL)."""

from __future__ import annotations

import math

from neuroal.data import perplexity_tokens, perplexity_windows
from orchestrator.chain.passes import Forward
from orchestrator.chain.session import Session


def perplexity(
    session: Session, name: str, seqlen: int, data_dir, *, batch: int = 4, max_windows: int | None = None
) -> tuple[float, dict]:
    """exp(mean NLL) over non-overlapping windows of the dataset's test stream (papers' protocol).

    Batches of `batch` windows go through the chain as it takes many streams (`Chain.nll_sum`:
    pipelined, or block-major when offloaded). `max_windows` keeps only
    the first windows (a quick estimate, recorded as such). The token stream is tokenized once per
    tokenizer and text, and kept on disk for the next command (`neuroal.data.TokenCache`).
    """
    key = (name, str(data_dir), seqlen)  # C4 is cut to 256 windows of seqlen
    if key not in session.token_cache:
        session.token_cache[key] = perplexity_tokens(name, lambda: session.tokenizer, seqlen, data_dir,
                                                     cache=session.token_files)
    ids, origin = session.token_cache[key]
    windows = perplexity_windows(ids, seqlen)
    all_windows = windows.shape[0]
    if max_windows is not None:
        windows = windows[:max_windows]
    session.ensure_kwargs(seqlen)
    chunks = [windows[i : i + batch] for i in range(0, windows.shape[0], batch)]
    total = session.chain.nll_sum(chunks, Forward(), chunk_bytes=batch * seqlen * session.config.hidden_size * 4)
    n = windows.shape[0]
    return math.exp(total / (n * seqlen)), {"origin": origin, "windows": n, "windows_available": all_windows,
                                            "tokens": int(ids.numel())}
