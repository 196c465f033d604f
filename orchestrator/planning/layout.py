"""A model measured on the meta device: parameter counts per decoder block and for the ends.

The planner reads only a config: parameter counts come from a meta-device skeleton
(`neuroal.models.build_skeleton`, no memory), so any supported family plans the same way.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from neuroal.families import Family, family_for, get_blocks
from neuroal.prunable import linear_shapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockLayout:
    """Parameter count and prunable-linear shapes of one decoder block.

    A mixture-of-experts block lists every expert's matrices among its linears (one unit per
    expert slice of a fused parameter, `neuroal.families.block_linears`) and names them in
    `experts`, with how many experts it has and how many each token is routed to.
    """

    params: int
    linears: tuple[tuple[str, int, int], ...]  # (name, out_features, in_features)
    experts: frozenset[str] = frozenset()  # the expert units among `linears`
    n_experts: int = 0  # experts of the MoE block (0: dense)
    experts_per_token: int = 0  # top-k routing

    @property
    def dense_sum_out(self) -> int:
        """Σ out over the linears every token goes through (all of them in a dense block)."""
        return sum(o for n, o, _ in self.linears if n not in self.experts)

    @property
    def routed_width(self) -> int:
        """Per token, Σ (out + in) of the expert matrices it is routed to: k/E of all experts' sum."""
        if not self.n_experts:
            return 0
        total = sum(o + i for n, o, i in self.linears if n in self.experts)
        return self.experts_per_token * total // self.n_experts

    @property
    def expert_params(self) -> int:
        """Parameters held in fused expert tensors."""
        return sum(o * i for n, o, i in self.linears if n in self.experts)

    @property
    def max_in(self) -> int:
        return max(i for _, _, i in self.linears)

    @property
    def sum_out(self) -> int:
        return sum(o for _, o, _ in self.linears)

    @property
    def sum_in(self) -> int:
        return sum(i for _, _, i in self.linears)

    @property
    def sum_in_sq(self) -> int:
        return sum(i * i for _, _, i in self.linears)

    @property
    def max_weight(self) -> int:
        return max(o * i for _, o, i in self.linears)

    @property
    def widest(self) -> tuple[int, int]:
        """(out, in) of the linear with the widest input (the solver's largest Hessian)."""
        _, o, i = max(self.linears, key=lambda t: (t[2], t[1]))
        return o, i


@dataclass(frozen=True)
class ModelLayout:
    """Parameter counts of a model by part, from a meta-device skeleton (no weights read).

    Attributes:
        model_type: ``config.model_type``.
        family: the family adapter's name.
        blocks: one entry per decoder block, in order.
        pre_params: everything before the blocks (embeddings, positional embeddings, projections).
        post_params: final norm, projections and the lm head (including a tied head's weight).
        tied_params: parameters of the lm head tied to the input embeddings (0 if untied); held by
            the first shard as embeddings and duplicated on the last shard as the head.
        hidden_size: width of the residual stream entering each block.
        vocab_size: width of the logits.
    """

    model_type: str
    family: str
    blocks: tuple[BlockLayout, ...]
    pre_params: int
    post_params: int
    tied_params: int
    hidden_size: int
    vocab_size: int

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def total_params(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return self.pre_params + sum(b.params for b in self.blocks) + self.post_params - self.tied_params


def _config_key(config) -> str | None:
    try:
        return config.to_json_string(use_diff=False)
    except (TypeError, ValueError):  # an unserialisable custom field: measure without caching
        return None


def measure_model(config) -> ModelLayout:
    """Count parameters per decoder block and for the parts before/after them.

    Builds the model on the meta device (accelerate ``init_empty_weights``) and classifies every
    parameter by name: under the family's block list → that block; under one of the family's head
    paths → post; anything else → pre. Buffers (rotary tables) are not counted.

    Raises:
        UnsupportedArchitecture: no family adapter for ``config.model_type``.
    """
    family = family_for(config)  # fail fast, before building anything
    return _measure(_config_key(config), config, family)


_LAYOUTS: dict[str, ModelLayout] = {}  # config JSON -> layout (a 70B skeleton takes ~1.5 s)


def _measure(key: str | None, config, family: Family) -> ModelLayout:
    if key is not None and key in _LAYOUTS:
        return _LAYOUTS[key]
    from neuroal.models import build_skeleton

    model = build_skeleton(copy.deepcopy(config))  # from_config sets attention fields on its config
    blocks = get_blocks(model, family)
    n_blocks = len(blocks)
    block_params = [0] * n_blocks
    pre = post = 0
    prefix = family.blocks + "."
    heads = tuple(path + "." for path in family.head)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix):
            block_params[int(name[len(prefix) :].split(".", 1)[0])] += p.numel()
        elif name.startswith(heads):
            post += p.numel()
        else:
            pre += p.numel()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_experts = top_k = 0
    experts: frozenset[str] = frozenset()
    if family.experts is not None:
        n_experts = int(getattr(text, family.experts.count))
        top_k = min(int(getattr(text, family.experts.top_k)), n_experts)
        experts = frozenset(family.experts.units(n_experts))
    layouts = tuple(
        BlockLayout(
            params=block_params[i],
            linears=tuple((n, o, i_) for n, (o, i_) in linear_shapes(blocks[i], family).items()),
            experts=experts,
            n_experts=n_experts,
            experts_per_token=top_k,
        )
        for i in range(n_blocks)
    )
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = 0
    if out_emb is not None and in_emb is not None and getattr(text, "tie_word_embeddings", False):
        tied = out_emb.weight.numel()
    hidden = getattr(text, "hidden_size", None) or layouts[0].linears[0][2]
    vocab = out_emb.weight.shape[0] if out_emb is not None else getattr(text, "vocab_size", 0)
    layout = ModelLayout(
        model_type=config.model_type,
        family=family.name,
        blocks=layouts,
        pre_params=pre,
        post_params=post,
        tied_params=tied,
        hidden_size=int(hidden),
        vocab_size=int(vocab),
    )
    if key is not None:
        if len(_LAYOUTS) >= 16:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = layout
    del model
    return layout
