"""Perplexity's accumulator, computed through the head in chunks of positions.

The papers' perplexity (`eval_ppl_wikitext` in the Wanda/SparseGPT code) is exp of the mean over
windows of each window's mean next-token NLL. Computing it needs the logits of every position, which
for a 49k-word vocabulary is [batch, seqlen, vocab] in fp32 (200 MB for 4 windows of 256 tokens);
here the head (final norm, projections, lm head, soft-cap) runs on chunks of positions of all windows
at once, so the head's GEMM is large and only a chunk's logits exist at a time.

>>> import torch
>>> head = torch.nn.Linear(4, 7)
>>> hidden, ids = torch.randn(2, 5, 4), torch.randint(0, 7, (2, 5))
>>> ref = sum(torch.nn.functional.cross_entropy(head(hidden[i, :-1]), ids[i, 1:]).item() * 5 for i in range(2))
>>> abs(nll_sum(head, hidden, ids, chunk_tokens=3) - ref) < 1e-4
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CHUNK_TOKENS = 2048  # positions per head call: ~400 MB of fp32 logits for a 49k vocabulary


@torch.no_grad()
def nll_sum(head: Callable[[Tensor], Tensor], hidden: Tensor, ids: Tensor, *, chunk_tokens: int = CHUNK_TOKENS) -> float:
    """Σ over windows of (mean next-token NLL of the window · seqlen).

    Args:
        head: hidden [n, d] -> logits [n, vocab] (any dtype; the loss is taken in fp32).
        hidden: [b, seqlen, d] the last block's output.
        ids: [b, seqlen] the windows' token ids.
    """
    b, seqlen, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)  # every position that predicts a next token
    targets = ids[:, 1:].reshape(-1).to(hidden.device)
    per_token = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for i in range(0, h.shape[0], chunk_tokens):
        logits = head(h[i : i + chunk_tokens]).float()
        per_token[i : i + chunk_tokens] = torch.nn.functional.cross_entropy(logits, targets[i : i + chunk_tokens],
                                                                             reduction="none")
    per_window = per_token.reshape(b, seqlen - 1).mean(dim=1)
    return float((per_window.double() * seqlen).sum().item())
