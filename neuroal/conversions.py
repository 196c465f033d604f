"""transformers' checkpoint→model merges (fused MoE experts), applied while loading tensor by tensor.

Hub checkpoints of Mixtral and Qwen3-MoE (and what `save_pretrained` writes for them) keep one
matrix per expert (`block_sparse_moe.experts.3.w1.weight`, `mlp.experts.3.up_proj.weight`, ...);
transformers 5 fuses them into [E, out, in] parameters on load (`conversion_mapping`: merge the
experts' list along a new dim 0, then concatenate gate and up along dim 1). `models.materialize`
reads tensors by name, so it hands the keys no module name matches to `ExpertMerges`, which maps
each to its fused target and expert index with the model's own converters and, once every part of
a target is read, builds it with the converters' own operations. Checkpoints that already hold the
fused tensors (what `neuroal prune` writes) load by name and never come here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_OPS = ("MergeModulelist", "Concatenate")  # the operations of the expert merges this module applies


def _merge_converters(model: nn.Module) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    out = []
    for t in get_model_conversion_mapping(model, add_legacy=False):
        ops = getattr(t, "operations", None) or []
        if isinstance(t, WeightConverter) and ops and all(type(op).__name__ in _OPS for op in ops):
            out.append(t)
    return out


def _index_pattern(source_pattern: str) -> re.Pattern:
    """`.experts.*.w1.weight` -> a regex capturing the expert index at the `*`."""
    return re.compile(re.escape(source_pattern).replace(r"\*", r"(\d+)"))


class ExpertMerges:
    """Per-expert checkpoint tensors gathered by fused target, then merged.

    Args:
        model: the (skeleton) model whose converters apply.
        renames: (pattern, replacement) checkpoint renames applied first (`models.checkpoint_renames`).
    """

    def __init__(self, model: nn.Module, renames=()):
        self.converters = _merge_converters(model)
        self.renames = list(renames)
        self.parts: dict[str, tuple[object, dict[str, dict[int, tuple[str, Path]]]]] = {}

    def add(self, ckpt_name: str, file: Path, model_key: Callable[[str], str | None], wanted) -> bool:
        """Take `ckpt_name` if it is one expert's part of a fused tensor the caller wants.

        Args:
            model_key: maps a renamed checkpoint name to the model's key (None if none).
            wanted: the caller's filter on model keys.

        Returns:
            Whether the key was one expert's part (wanted or not).
        """
        name = ckpt_name
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        for conv in self.converters:
            target, source = conv.rename_source_key(name)
            if source is None:
                continue
            found = _index_pattern(source).search(name)
            key = model_key(target)
            if found is None or key is None:
                return False
            if wanted(key):
                _, by_source = self.parts.setdefault(key, (conv, {}))
                by_source.setdefault(source, {})[int(found.group(1))] = (ckpt_name, file)
            return True
        return False

    def tensors(self, fetch=None, dtype: torch.dtype | None = None):
        """Yield (model key, fused tensor) for every target gathered, experts in index order."""
        for key, (conv, by_source) in self.parts.items():
            inputs = {}
            for source in conv.source_patterns:  # the converter's order: gate before up
                experts = by_source.get(source, {})
                if sorted(experts) != list(range(len(experts))):
                    raise ValueError(f"{key}: checkpoint holds experts {sorted(experts)} of {source}")
                inputs[source] = [_read(*experts[e], fetch) for e in range(len(experts))]
            for op in conv.operations:
                inputs = op.convert(inputs, source_patterns=list(conv.source_patterns),
                                    target_patterns=list(conv.target_patterns))
            (t,) = inputs.values()
            yield key, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def _read(ckpt_name: str, file: Path, fetch) -> Tensor:
    if not file.exists() and fetch is not None:
        fetch(file)
    with safe_open(file, "pt", device="cpu") as f:
        return f.get_tensor(ckpt_name)
