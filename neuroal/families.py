"""Family adapters: where each architecture keeps its blocks, prunable linears and row-step map.

A family is data, chosen by `config.model_type` (never by model name). Calling one block on its own
does not need per-family code: `capture_block_inputs` runs the model's own forward up to the first
block and records the exact keyword arguments (rotary `position_embeddings`, `position_ids`, the
attention mask) that the model passes to every block; those are batch-size independent (we force
SDPA attention, whose causal mask is implicit) and are reused for every block and every stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from neuroal.errors import UnsupportedArchitecture

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """How one group of architectures is laid out.

    Attributes:
        name: family name shown to users.
        model_types: the `config.model_type` values it covers.
        blocks: attribute path of the decoder-block ModuleList inside the CausalLM.
        head: module paths applied in order to the last hidden state to get logits (final norm,
            optional projections, lm head); missing (None) modules are skipped.
        linears: the prunable linears of one block, relative to the block, in forward order.
        row_map: NeuroAL row step, (consumer, producers): the consumer's input-norm change is
            spread over the producers' output rows. The next block's first linear feeding this
            block's last linear is implied for every family that has a row map.
        mlp: linears that belong to the MLP (DSnoT skips them by default, as its reference).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    head: tuple[str, ...]
    linears: tuple[str, ...]
    row_map: tuple[tuple[str, tuple[str, ...]], ...] = ()
    mlp: tuple[str, ...] = field(default=())
    # linears the block uses through `.weight` instead of calling them: their input is read from
    # another linear's output, (source linear, first column, number of columns)
    input_from: tuple[tuple[str, tuple[str, int, str]], ...] = ()

    @property
    def has_row_step(self) -> bool:
        return bool(self.row_map)


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA_ROW_MAP = (
    ("self_attn.o_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.gate_proj", ("self_attn.o_proj",)),
    ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        linears=_LLAMA_LINEARS,
        row_map=_LLAMA_ROW_MAP,
        mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        linears=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ),
        # reference (lib/neuroal.py, OPT/Phi rule): out_proj -> q,k,v; fc1 -> out_proj; fc2 -> fc1
        row_map=(
            ("self_attn.out_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("fc1", ("self_attn.out_proj",)),
            ("fc2", ("fc1",)),
        ),
        mlp=("fc1", "fc2"),
    ),
    Family(
        name="phi",
        model_types=("phi",),
        blocks="model.layers",
        head=("model.final_layernorm", "lm_head"),
        linears=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.dense",
            "mlp.fc1",
            "mlp.fc2",
        ),
        row_map=(
            ("self_attn.dense", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp.fc1", ("self_attn.dense",)),
            ("mlp.fc2", ("mlp.fc1",)),
        ),
        mlp=("mlp.fc1", "mlp.fc2"),
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        head=("gpt_neox.final_layer_norm", "lm_head"),
        linears=(
            "attention.query_key_value",
            "attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        ),
        # OPT/Phi analogue; the fused qkv has 3x the consumer's width, so it keeps the block
        # ratio under the width rule (see `row_groups`), like grouped-query attention.
        row_map=(
            ("attention.dense", ("attention.query_key_value",)),
            ("mlp.dense_h_to_4h", ("attention.dense",)),
            ("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),
        ),
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    Family(
        name="mamba",
        model_types=("mamba",),
        blocks="backbone.layers",
        head=("backbone.norm_f", "lm_head"),
        linears=("mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"),
        # no producer/consumer map for the selective-scan mixer: NeuroAL runs its block step only
        row_map=(),
        mlp=(),
        # MambaMixer computes `dt_proj.weight @ time_step`, time_step = x_proj(x)[..., :time_step_rank]
        input_from=(("mixer.dt_proj", ("mixer.x_proj", 0, "time_step_rank")),),
    ),
    Family(
        name="mamba2",
        model_types=("mamba2",),
        blocks="backbone.layers",
        head=("backbone.norm_f", "lm_head"),
        linears=("mixer.in_proj", "mixer.out_proj"),
        row_map=(),
        mlp=(),
    ),
)

_BY_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def family_for(config) -> Family:
    """The family adapter for a transformers config.

    Raises:
        UnsupportedArchitecture: naming the model type and the supported list.
    """
    model_type = getattr(config, "model_type", None) or "unknown"
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitecture(model_type, _BY_TYPE) from None


def get_blocks(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(family.blocks)


def block_linears(block: nn.Module, family: Family) -> dict[str, nn.Linear]:
    """The prunable linears of one block, in forward order."""
    return {name: block.get_submodule(name) for name in family.linears}


def linear_shapes(block: nn.Module, family: Family) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each prunable linear of a block."""
    return {name: (lin.out_features, lin.in_features) for name, lin in block_linears(block, family).items()}


def row_groups(family: Family, shapes: dict[str, tuple[int, int]], has_next: bool):
    """Row-step groups of one block: (consumer key, producers) where widths allow it.

    The consumer key is the linear name, or ``"next:" + name`` for the next block's first linear.
    A group whose producers' output rows differ from the consumer's input width keeps the block
    ratio for all its producers: this is the reference's Mistral rule for q, k and v, applied to
    every grouped-query-attention model (DESIGN §4) and to fused qkv projections.

    Args:
        shapes: (out, in) per linear name (blocks of one model share them).
        has_next: False for the last block, whose last linear has no consumer.

    Returns:
        (groups, kept): groups is a list of (consumer key, producers); kept lists producers that
        keep the block ratio because of the width rule.
    """
    groups, kept = [], []
    pairs = list(family.row_map)
    if family.row_map and has_next:
        pairs.append(("next:" + family.linears[0], (family.linears[-1],)))
    for consumer, producers in pairs:
        width = shapes[consumer.removeprefix("next:")][1]
        if all(shapes[p][0] == width for p in producers):
            groups.append((consumer, producers))
        else:
            kept.extend(producers)
    return groups, kept


class _StopForward(Exception):
    """Raised by the capture hook to stop the model's forward at the first block (not an error)."""


@dataclass
class BlockInputs:
    """Hidden states entering block 0 and the keyword arguments every block is called with."""

    hidden: Tensor  # [n, seqlen, d]
    kwargs: dict


def capture_block_inputs(model: nn.Module, family: Family, input_ids: Tensor) -> BlockInputs:
    """Run the model's own forward up to the first block and record what it passes in.

    Only the modules before the first block (embeddings, rotary tables, position embeddings) run,
    so this works on a model whose other blocks are still on the meta device.
    """
    block0 = get_blocks(model, family)[0]
    seen: dict = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError("the first decoder block was never called: cannot capture its inputs")
    return BlockInputs(hidden=seen["hidden"], kwargs=seen["kwargs"])


def call_block(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """Call one decoder block on [b, seqlen, d] hidden states; returns the new hidden states."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def apply_head(model: nn.Module, family: Family, hidden: Tensor) -> Tensor:
    """Final norm, projections and lm head: hidden [b, s, d] -> logits [b, s, vocab]."""
    x = hidden
    for path in family.head:
        parent, _, leaf = path.rpartition(".")
        module = getattr(model.get_submodule(parent) if parent else model, leaf)
        if module is not None:  # optional projections (OPT's project_out) are None when unused
            x = module(x)
    return x
