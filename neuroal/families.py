"""Family adapters: where each architecture keeps its blocks, prunable linears and row-step map.

A family is data, chosen by `config.model_type` (never by model name). Calling one block on its own
does not need per-family code (`neuroal.block_forward`); the prunable units of a block are in
`neuroal.prunable`, and the row step over a family's row map in `neuroal.row_map`.

Mixture-of-experts blocks (Mixtral, Qwen3-MoE) keep their experts fused, as transformers 5 stores
them: `mlp.experts.gate_up_proj` [E, 2·inter, hidden] and `mlp.experts.down_proj` [E, hidden,
inter], used as `F.linear(x, param[e])`, so each expert's slice is [out, in] like a linear's weight.
Each slice is one prunable unit, named ``mlp.experts.gate_up_proj[3]``; `prunable.block_linears`
returns an `ExpertMatrix` for it, whose `.weight` is a view into the fused parameter, so ratios,
masks, statistics, sparsity reports and allocators see one more linear-like matrix. The router
(`mlp.gate`) is never pruned. `family_for(config)` lists the units of the config's expert count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from torch import nn

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
        # gate_up_proj rows [gate | up] (see `row_segments` and `row_map.producer_rows`)
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
        # ratio under the width rule (see `row_map.row_groups`), like grouped-query attention.
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
