"""Shard planning: split a model's decoder blocks into shards that fit a per-actor memory budget.

One module per idea: `sizes` (``--gpu-mem`` / ``--dtype`` values), `layout` (a model measured on
the meta device), `memory` (the activation model), `shards` (the records a plan hands out),
`partition` (the exact DPs and `plan_shards`) and `render` (config loading and ``neuroal plan``).
"""

from orchestrator.planning.layout import BlockLayout, ModelLayout, measure_model
from orchestrator.planning.memory import ActivationEstimate, estimate_activation
from orchestrator.planning.partition import plan_shards
from orchestrator.planning.render import load_plan_config, plan_lines, render_plan
from orchestrator.planning.shards import Plan, ShardPlan, ShardSpec
from orchestrator.planning.sizes import DTYPE_BYTES, canonical_dtype, format_bytes, parse_bytes

__all__ = [
    "DTYPE_BYTES",
    "ActivationEstimate",
    "BlockLayout",
    "ModelLayout",
    "Plan",
    "ShardPlan",
    "ShardSpec",
    "canonical_dtype",
    "estimate_activation",
    "format_bytes",
    "load_plan_config",
    "measure_model",
    "parse_bytes",
    "plan_lines",
    "plan_shards",
    "render_plan",
]
