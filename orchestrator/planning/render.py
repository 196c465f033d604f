"""The planner at the command line (``neuroal plan``): read a config, show the plan."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from neuroal.errors import ModelLoadError
from orchestrator.planning.cost import PassCost
from orchestrator.planning.offloaded import OffloadPlan
from orchestrator.planning.shards import Plan
from orchestrator.planning.sizes import format_bytes

logger = logging.getLogger(__name__)


def load_plan_config(model_or_config_path: str):
    """Read a transformers config for planning, never weights.

    Accepts a path to a ``config.json`` file, a local folder holding one, the embedded default
    ``smollm2-135m`` (through `neuroal.models.resolve_model`), or a Hugging Face hub id (needs the
    network or a populated hub cache).

    Raises:
        ModelLoadError: in one line, when the config cannot be read.
    """
    from transformers import AutoConfig

    from neuroal.models import DEFAULT_MODEL, load_config, resolve_model

    name = str(model_or_config_path)
    if name == DEFAULT_MODEL:
        return load_config(resolve_model(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model: {name!r} has no config.json")
        return load_config(path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ModelLoadError(f"model: config file {name!r} does not exist")
        try:
            data = json.loads(path.read_text())
            model_type = data.pop("model_type")
            return AutoConfig.for_model(model_type, **data)
        except KeyError:
            raise ModelLoadError(f"model: {name!r} has no 'model_type'") from None
        except Exception as exc:
            raise ModelLoadError(f"model: unreadable config {name!r} ({type(exc).__name__}: {exc})") from exc
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as exc:  # offline, gated, missing: one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(
            f"model: cannot read the config of {name!r} (not a local file or folder; hub: "
            f"{type(exc).__name__}: {first})"
        ) from exc


def plan_lines(plan: Plan) -> list[str]:
    """The plan as plain text lines (a header, one line per shard, the budget)."""
    lines = [_title(plan)]
    for row in _rows(plan):
        lines.append("  ".join(f"{cell:>{w}}" for cell, w in zip(row, (5, 9, 3, 3, 4, 9, 11, 9, 5))))
    lines.append(_caption(plan))
    return lines


def _title(plan: Plan) -> str:
    return (
        f"{plan.model_type}: {plan.n_blocks} blocks, {plan.total_params / 1e9:.2f}B params, {plan.dtype}"
        f"{' (tied head)' if plan.tied_embeddings else ''} -> {plan.n_actors} actor(s) x "
        f"{format_bytes(plan.mem_per_actor)}"
    )


def _caption(plan: Plan) -> str:
    return (
        f"budget {format_bytes(plan.budget_bytes)} per actor ({plan.headroom:.0%} headroom); activations: "
        f"{plan.streams_in_flight} streams x {plan.stream_windows} windows (final pass: {plan.nsamples}) x "
        f"{plan.seqlen} tokens, "
        f"method {plan.method}"
    )


def _rows(plan: Plan) -> list[tuple[str, ...]]:
    rows = [("shard", "blocks", "n", "emb", "head", "params", "activations", "total", "use")]
    for s in plan.shards:
        rows.append(
            (
                str(s.index),
                f"{s.first_block}-{s.last_block}",
                str(s.n_blocks),
                "yes" if s.has_embeddings else "",
                "yes" if s.has_head else "",
                format_bytes(s.param_bytes),
                format_bytes(s.activation_bytes),
                format_bytes(s.total_bytes),
                f"{s.total_bytes / plan.mem_per_actor:.0%}",
            )
        )
    return rows


def render_plan(plan: Plan):
    """A `rich.table.Table` of the plan, one row per actor (for ``neuroal plan``)."""
    from rich.table import Table

    table = Table(title=_title(plan), caption=_caption(plan))
    header, *rows = _rows(plan)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i in (1, 3, 4) else "right")
    for row in rows:
        table.add_row(*row)
    return table


def render_offloaded(oplan: OffloadPlan, passes: list[PassCost], method: str, how: str):
    """Tables of an offloaded plan (``neuroal plan`` when the blocks do not fit): each actor's device,
    host and disk need, then the projected time of each pass (`orchestrator.planning.cost`); `how`
    says how the time was projected."""
    from rich.table import Table

    plan = oplan.plan
    where = "host memory" if oplan.mode == "cpu" else "local disk"
    title = (f"{plan.model_type}: {plan.n_blocks} blocks, {plan.total_params / 1e9:.2f}B params, {plan.dtype} -> "
             f"{plan.n_actors} actor(s) x {format_bytes(plan.mem_per_actor)}, offloaded to {where} "
             f"(one block at a time on the device)")
    caption = (f"budget {format_bytes(plan.budget_bytes)} per actor ({plan.headroom:.0%} headroom); device: the "
               f"largest block, the embeddings/head and the larger of {plan.stream_windows}-window x 15-candidate "
               f"search and {oplan.nsamples}-window final-pass activations at {plan.seqlen} tokens"
               + (f"\n{oplan.reason}" if oplan.reason else ""))
    table = Table(title=title, caption=caption)
    for i, name in enumerate(("shard", "blocks", "n", "emb", "head", "device", "use", "host", "disk")):
        table.add_column(name, justify="left" if i in (1, 3, 4) else "right")
    for s, o in zip(plan.shards, oplan.shards):
        table.add_row(str(s.index), f"{s.first_block}-{s.last_block}", str(s.n_blocks),
                      "yes" if s.has_embeddings else "", "yes" if s.has_head else "", format_bytes(o.device_bytes),
                      f"{o.device_bytes / plan.mem_per_actor:.0%}", format_bytes(o.host_bytes),
                      format_bytes(o.disk_bytes) if o.disk_bytes else "")
    times = Table(title=f"Projected time of a {method} prune with a NeuroAL search", caption=how)
    for name in ("pass", "windows", "compute (min)", "moves (min)", "total (min)"):
        times.add_column(name, justify="left" if name == "pass" else "right")
    for p in passes:
        times.add_row(p.name, str(p.windows), f"{p.compute_s / 60:.1f}", f"{p.move_s / 60:.1f}", f"{p.seconds / 60:.1f}")
    times.add_row("total", "", f"{sum(p.compute_s for p in passes) / 60:.1f}",
                  f"{sum(p.move_s for p in passes) / 60:.1f}", f"{sum(p.seconds for p in passes) / 60:.1f}")
    return table, times
