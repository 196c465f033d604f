"""NeuroAL's row step over a family's row map: which producers take a consumer's per-channel change,
and how that change is laid over their output rows (fused producers included)."""

from __future__ import annotations

import numpy as np

from neuroal.families import Family


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
