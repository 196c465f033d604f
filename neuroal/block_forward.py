"""A model forwarded block by block: the inputs each block gets, one block called, the head applied.

Calling one block on its own does not need per-family code: `capture_block_inputs` runs the model's
own forward with every block replaced by a recorder and keeps the exact keyword arguments (rotary
`position_embeddings`, `position_ids`, the attention mask) the model passes to each block. Models
that mix layer kinds (Gemma 2/3 sliding-window and full attention, Gemma 3's local and global rotary
tables) pass different kwargs to different blocks, so they are kept per block. They do not depend on
the batch size: with SDPA the full causal mask is implicit (None), and materialised masks (sliding
windows, eager attention) come as [1, 1, S, S] and broadcast over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from neuroal.families import Family, get_blocks


class _StopForward(Exception):
    """Raised by the last block's recorder to stop the model's forward (not an error)."""


@dataclass
class BlockInputs:
    """Hidden states entering block 0 and the keyword arguments each block is called with.

    Attributes:
        hidden: [n, seqlen, d] hidden states entering block 0.
        kwargs: block 0's keyword arguments (what older callers reuse for every block).
        layer_kwargs: one dict per block; blocks called alike share one dict object (Llama: one
            dict for all; Gemma: one per attention kind), and dicts share their tensors.
    """

    hidden: Tensor  # [n, seqlen, d]
    kwargs: dict
    layer_kwargs: list[dict] = field(default_factory=list)

    def kwargs_for(self, block_index: int) -> dict:
        """The keyword arguments the model passes to block `block_index`."""
        return self.layer_kwargs[block_index] if self.layer_kwargs else self.kwargs


class _Recorder(nn.Module):
    """Stands in for one block during capture: records its call and passes the hidden states on."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((hidden, kwargs))
        if self.last:
            raise _StopForward
        return hidden


def _share_identical(per_block: list[dict]) -> list[dict]:
    """One dict object for blocks whose kwargs hold the very same objects (cheap to keep and ship)."""
    out: list[dict] = []
    for kw in per_block:
        same = next((d for d in out if d.keys() == kw.keys() and all(d[k] is kw[k] for k in kw)), None)
        out.append(same if same is not None else kw)
    return out


def capture_block_inputs(model: nn.Module, family: Family, input_ids: Tensor) -> BlockInputs:
    """Run the model's own forward with its blocks replaced by recorders; keep what each gets.

    Only what the model computes before its first block (embeddings, rotary tables, masks) runs,
    and the forward stops at the last recorder, so this works on a skeleton whose blocks and head
    are still on the meta device. Kwargs captured with a batch of one serve any batch size.

    Returns:
        `BlockInputs`: the hidden states entering block 0 and every block's kwargs.

    Raises:
        RuntimeError: the model's forward did not call each of its blocks.
    """
    blocks = get_blocks(model, family)
    originals = list(blocks)
    calls: list = []
    for i in range(len(originals)):
        blocks[i] = _Recorder(calls, last=i == len(originals) - 1)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if len(calls) != len(originals):
        raise RuntimeError(f"the model called {len(calls)} of its {len(originals)} blocks: cannot capture their inputs")
    layer_kwargs = _share_identical([kw for _, kw in calls])
    return BlockInputs(hidden=calls[0][0], kwargs=layer_kwargs[0], layer_kwargs=layer_kwargs)


def call_block(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """Call one decoder block on [b, seqlen, d] hidden states; returns the new hidden states."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def apply_head(model: nn.Module, family: Family, hidden: Tensor) -> Tensor:
    """Final norm, projections, lm head and logit soft-cap: hidden [b, s, d] -> logits [b, s, vocab]."""
    x = hidden
    for path in family.head:
        parent, _, leaf = path.rpartition(".")
        module = getattr(model.get_submodule(parent) if parent else model, leaf)
        if module is not None:  # optional projections (OPT's project_out) are None when unused
            x = module(x)
    cap = getattr(model.config, family.logit_softcap, None) if family.logit_softcap else None
    if cap:  # as the CausalLM's forward: logits = cap · tanh(logits / cap)
        x = torch.tanh(x / cap) * cap
    return x
