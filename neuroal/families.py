"""Family adapters: where each architecture keeps its blocks, prunable linears and row-step map.

A family is data, chosen by `config.model_type` (never by model name). Calling one block on its own
does not need per-family code: `capture_block_inputs` runs the model's own forward with every block
replaced by a recorder and keeps the exact keyword arguments (rotary `position_embeddings`,
`position_ids`, the attention mask) the model passes to each block. Models that mix layer kinds
(Gemma 2/3 sliding-window and full attention, Gemma 3's local and global rotary tables) pass
different kwargs to different blocks, so they are kept per block. They do not depend on the batch
size: with SDPA the full causal mask is implicit (None), and materialised masks (sliding windows,
eager attention) come as [1, 1, S, S] and broadcast over the batch.

Mixture-of-experts blocks (Mixtral, Qwen3-MoE) keep their experts fused, as transformers 5 stores
them: `mlp.experts.gate_up_proj` [E, 2·inter, hidden] and `mlp.experts.down_proj` [E, hidden,
inter], used as `F.linear(x, param[e])`, so each expert's slice is [out, in] like a linear's weight.
Each slice is one prunable unit, named ``mlp.experts.gate_up_proj[3]``; `block_linears` returns an
`ExpertMatrix` for it, whose `.weight` is a view into the fused parameter, so ratios, masks,
statistics, sparsity reports and allocators see one more linear-like matrix. The router
(`mlp.gate`) is never pruned. `family_for(config)` lists the units of the config's expert count.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from neuroal.errors import UnsupportedArchitecture

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Experts:
    """The fused experts of a mixture-of-experts block (transformers 5 layout).

    The experts module is called as ``experts(hidden [T, d], top_k_index [T, k], top_k_weights
    [T, k])`` on the flattened tokens of the MoE block, which itself gets [b, seqlen, d]: a forward
    pre-hook on it sees which experts every token is routed to, whatever kernel runs the experts
    (eager, grouped_mm). Expert e computes ``down[e] @ _apply_gate(gate_up[e] @ x)`` (transformers'
    `_apply_gate`: act(gate) · up over the two halves of the gate_up rows).

    Attributes:
        moe: path of the sparse-MoE block (input [b, seqlen, d]).
        module: path of the experts module holding the fused parameters.
        gate_up: its [E, 2·inter, hidden] parameter.
        down: its [E, hidden, inter] parameter.
        router: path of the router, never pruned (documentation and tests).
        count: config attribute holding the number of experts.
        top_k: config attribute holding how many experts each token is routed to (the planner's
            estimate of the routed tokens' activations).
        uniform: (config attribute, value) pairs under which every block has the MoE MLP (Qwen3-MoE
            can make some layers dense: `mlp_only_layers`, `decoder_sparse_step`); other values
            are refused, since blocks of one model must share their prunable units.
    """

    moe: str = "mlp"
    module: str = "mlp.experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    router: str = "mlp.gate"
    count: str = "num_local_experts"
    top_k: str = "num_experts_per_tok"
    uniform: tuple[tuple[str, object], ...] = ()

    def units(self, n_experts: int) -> tuple[str, ...]:
        """Unit names, expert by expert in forward order: gate_up[0], down[0], gate_up[1], ..."""
        return tuple(f"{self.module}.{p}[{e}]" for e in range(n_experts) for p in (self.gate_up, self.down))


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
        input_from: linears the block uses through `.weight` instead of calling them: their input
            is read from another linear's output, (source linear, first column, config attribute
            holding the number of columns).
        row_segments: fused producers whose output rows are k consecutive copies of their
            consumer's input width, (producer, k): Phi-3's `gate_up_proj` is [gate | up] (2) and
            its `qkv_proj` [q | k | v] (3, which only fits without grouped-query attention).
        attn_implementation: attention kernel the model is built with: SDPA keeps the causal
            mask implicit; Gemma 2 refuses SDPA (attention soft-capping), so eager; None for
            models without attention.
        logit_softcap: config attribute of the final-logit tanh soft-cap the CausalLM applies
            after its lm head (Gemma's `final_logit_softcapping`); None when there is none.
        experts: the fused experts of a mixture-of-experts block; `family_for(config)` appends
            their units to `linears` and `mlp` (the table holds the attention linears only).
        no_row_step: why the family has no NeuroAL row step (run.json's notes), when it has none.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    head: tuple[str, ...]
    linears: tuple[str, ...]
    row_map: tuple[tuple[str, tuple[str, ...]], ...] = ()
    mlp: tuple[str, ...] = field(default=())
    input_from: tuple[tuple[str, tuple[str, int, str]], ...] = ()
    row_segments: tuple[tuple[str, int], ...] = ()
    attn_implementation: str | None = "sdpa"
    logit_softcap: str | None = None
    experts: Experts | None = None
    no_row_step: str = ""

    @property
    def has_row_step(self) -> bool:
        return bool(self.row_map)

    def for_config(self, config) -> Family:
        """This family with the units that depend on the config (one pair per expert) listed.

        Raises:
            UnsupportedArchitecture: the config makes some blocks dense and others MoE.
        """
        if self.experts is None:
            return self
        for attr, value in self.experts.uniform:
            got = getattr(config, attr, value)
            if _as_tuple(got) != _as_tuple(value):
                raise UnsupportedArchitecture(f"{config.model_type} with {attr}={got!r} (dense and MoE blocks mixed)",
                                              _BY_TYPE)
        units = self.experts.units(int(getattr(config, self.experts.count)))
        return replace(self, linears=self.linears + units, mlp=self.mlp + units)

    def segments(self, producer: str) -> int:
        """How many copies of its consumer's input width a producer's output rows hold (1 unless fused)."""
        return dict(self.row_segments).get(producer, 1)


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

_LLAMA = Family(
    # Llama 3.x is `llama` too: its `llama3` rope scaling lives in the rotary module, and its
    # tied head (1B/3B) is filled from the embedding by `models.materialize`. OLMo 2's
    # post-norms and q/k norms sit inside the block, so it has Llama's layout.
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "olmo2"),
    blocks="model.layers",
    head=("model.norm", "lm_head"),
    linears=_LLAMA_LINEARS,
    row_map=_LLAMA_ROW_MAP,
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

_MOE_NO_ROW_STEP = (
    "mixture of experts: NeuroAL runs the block step only (the row step maps one consumer's input change "
    "onto its producers' rows, but the router sends each token to other experts, so o_proj feeds no single "
    "consumer and each expert's statistics cover another subset of tokens)"
)

FAMILIES: tuple[Family, ...] = (
    _LLAMA,
    # Llama's layout between extra pre/post feed-forward norms; sliding-window and full attention
    # layers alternate (per-block kwargs); the head soft-caps the logits. Gemma 2 refuses SDPA
    # (it cannot soft-cap attention scores); Gemma 3 allows it and adds local/global rotary tables.
    replace(_LLAMA, name="gemma2", model_types=("gemma2",), attn_implementation="eager",
            logit_softcap="final_logit_softcapping"),
    replace(_LLAMA, name="gemma3", model_types=("gemma3_text",), logit_softcap="final_logit_softcapping"),
    Family(
        # fused projections, each pruned as one matrix: qkv_proj rows are [q | k | v] and
        # gate_up_proj rows [gate | up] (see `row_segments` and `producer_rows`)
        name="phi3",
        model_types=("phi3",),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        row_map=(
            ("self_attn.o_proj", ("self_attn.qkv_proj",)),
            ("mlp.gate_up_proj", ("self_attn.o_proj",)),
            ("mlp.down_proj", ("mlp.gate_up_proj",)),
        ),
        mlp=("mlp.gate_up_proj", "mlp.down_proj"),
        row_segments=(("self_attn.qkv_proj", 3), ("mlp.gate_up_proj", 2)),
    ),
    # mixture of experts: Llama's attention, fused experts pruned expert by expert; the row step
    # does not apply (see `no_row_step`)
    Family(
        name="mixtral",
        model_types=("mixtral",),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        linears=_LLAMA_LINEARS[:4],
        experts=Experts(count="num_local_experts"),
        no_row_step=_MOE_NO_ROW_STEP,
    ),
    Family(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        linears=_LLAMA_LINEARS[:4],
        experts=Experts(count="num_experts", uniform=(("mlp_only_layers", ()), ("decoder_sparse_step", 1))),
        no_row_step=_MOE_NO_ROW_STEP,
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
        attn_implementation=None,
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
        attn_implementation=None,
    ),
)

_BY_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def family_for(config) -> Family:
    """The family adapter for a transformers config.

    Raises:
        UnsupportedArchitecture: naming the model type and the supported list.
    """
    model_type = getattr(config, "model_type", None) or "unknown"
    try:
        family = _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitecture(model_type, _BY_TYPE) from None
    return family.for_config(config)


def attn_implementation(config) -> str | None:
    """The attention kernel to build `config`'s model with: its family's, SDPA for unknown types."""
    family = _BY_TYPE.get(getattr(config, "model_type", None))
    return family.attn_implementation if family else "sdpa"


def get_blocks(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(family.blocks)


class ExpertMatrix:
    """One expert's matrix inside a fused [E, out, in] parameter, seen as a linear.

    `.weight` is the [out, in] view ``param.data[index]``, read anew on each access: write through
    it (``unit.weight.data.copy_(W)``, ``unit.weight.copy_(W)``) or rebind the whole parameter
    (``unit.parameter.data = new``); rebinding ``unit.weight.data`` would change a temporary view
    only.
    """

    def __init__(self, experts: nn.Module, spec: Experts, param: str, index: int, moe: nn.Module):
        self.experts, self.spec, self.param, self.index, self.moe = experts, spec, param, index, moe

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.experts, self.param)

    @property
    def weight(self) -> Tensor:  # [out, in]
        return self.parameter.data[self.index]

    @property
    def out_features(self) -> int:
        return self.parameter.shape[1]

    @property
    def in_features(self) -> int:
        return self.parameter.shape[2]

    @property
    def is_gate_up(self) -> bool:
        return self.param == self.spec.gate_up

    def __repr__(self) -> str:
        return f"ExpertMatrix({self.spec.module}.{self.param}[{self.index}], {self.out_features}x{self.in_features})"


_UNIT = re.compile(r"(?P<module>.+)\.(?P<param>\w+)\[(?P<index>\d+)\]")


def block_linears(block: nn.Module, family: Family) -> dict[str, nn.Module | ExpertMatrix]:
    """The prunable units of one block, in forward order: its linears, then each expert's matrices.

    Plain linears are the block's own `nn.Linear` modules; an expert's matrix is an `ExpertMatrix`
    (a `.weight` [out, in] view, `out_features`, `in_features`).
    """
    out = {}
    for name in family.linears:
        unit = _UNIT.fullmatch(name) if family.experts is not None else None
        if unit is None:
            out[name] = block.get_submodule(name)
        else:
            out[name] = ExpertMatrix(block.get_submodule(unit["module"]), family.experts, unit["param"],
                                     int(unit["index"]), block.get_submodule(family.experts.moe))
    return out


def linear_shapes(block: nn.Module, family: Family) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each prunable linear of a block."""
    return {name: (lin.out_features, lin.in_features) for name, lin in block_linears(block, family).items()}


def row_groups(family: Family, shapes: dict[str, tuple[int, int]], has_next: bool):
    """Row-step groups of one block: (consumer key, producers) where widths allow it.

    The consumer key is the linear name, or ``"next:" + name`` for the next block's first linear.
    A producer fits when its output rows are `family.segments(p)` times the consumer's input width
    (once for a plain linear, twice for Phi-3's [gate | up], ...); lay the consumer's change over
    its rows with `producer_rows`. A group with a producer that does not fit keeps the block ratio
    for all its producers: this is the reference's Mistral rule for q, k and v, applied to every
    grouped-query-attention model (DESIGN §4), fused [q | k | v] included, and to GPT-NeoX's
    head-interleaved qkv.

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
        if all(shapes[p][0] == family.segments(p) * width for p in producers):
            groups.append((consumer, producers))
        else:
            kept.extend(producers)
    return groups, kept


def producer_rows(r, family: Family, producer: str, shapes: dict[str, tuple[int, int]]) -> np.ndarray | None:
    """The consumer's per-channel change r laid over a producer's output rows.

    Output row j of a fused producer feeds input channel ``j mod len(r)`` of its consumer's
    segment (Phi-3: gate row j and up row j both reach down_proj's channel j), so r is tiled
    `family.segments(producer)` times; a plain producer gets r itself.

    Args:
        r: the consumer's change a^d − a^s, one value per consumer input channel.
        producer: a linear of `family.linears`.
        shapes: (out, in) per linear name.

    Returns:
        A float64 array of length out(producer), or None when its rows do not match r (grouped-
        query attention): the producer then keeps its block ratio, as `row_groups` says.

    Example:
        Phi-3's `mlp.gate_up_proj` with 6 output rows and down_proj's r = [1, 2, 3] (intermediate
        size 3) gives [1, 2, 3, 1, 2, 3]; feed that to the row schedule, whose min-max and mean are
        the same over the copies, so each half gets the consumer's row sparsities.
    """
    r = np.asarray(r, dtype=np.float64).reshape(-1)
    k = family.segments(producer)
    if shapes[producer][0] != k * r.size:
        return None
    return np.tile(r, k)


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
