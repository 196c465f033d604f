"""The pruned checkpoint in Hugging Face layout, written where the run folder is: shards write their own
tensors (to a URI, or to a local folder in process) or stream their file to the driver (Ray actors, which
may be on another node), then config, tokenizer and the index, last."""

from __future__ import annotations

import json
from pathlib import Path

from neuroal import fileio
from orchestrator.chain.shard import Shard
from orchestrator.results.run_folder import _COPY, INDEX


PULL_CHUNK = 64 * 2**20


def _pull_file(chain, shard: int, part: dict, folder: Path) -> None:
    """Copy the file a shard saved on its node into `folder`, a chunk at a time (atomically)."""
    with fileio.atomic_path(folder / part["file"]) as tmp, open(tmp, "wb") as f:
        for offset in range(0, part["bytes"], PULL_CHUNK):
            f.write(chain.get(chain.call(shard, Shard.read_bytes, part["local"], offset, PULL_CHUNK)))
    chain.get(chain.call(shard, Shard.drop_file, part["local"]))


def save_checkpoint(session, location: str, *, direct: bool) -> None:
    """The pruned checkpoint in Hugging Face layout: shards' tensors, then config, tokenizer, index.

    Args:
        direct: shards write their file to `location` themselves (a URI, or a local folder of an
            in-process run); otherwise each returns its file and this process writes it.
    """
    chain = session.chain
    handles = [chain.call(i, Shard.save, location if direct else None) for i in range(chain.n_shards)]
    maps, total = [], 0
    for shard, h in enumerate(handles):
        part = chain.get(h)
        if part["local"] is not None:
            _pull_file(chain, shard, part, Path(location))
        maps.append(part["weight_map"])
        total += part["bytes"]
    stored = chain.get(chain.call(0, Shard.report))["dtype"]
    for name in _COPY:
        src = session.model_dir / name
        if name == "config.json":  # say the dtype the weights are stored in, not the source's
            config = json.loads(src.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = stored
            fileio.write_text(fileio.join(location, name), json.dumps(config, indent=2) + "\n")
        elif src.exists():
            fileio.put_file(src, fileio.join(location, name))
    weight_map = {k: v for m in maps for k, v in m.items()}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    fileio.write_text(fileio.join(location, INDEX), json.dumps(index, indent=2))  # last: the checkpoint's manifest
