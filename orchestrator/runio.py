"""Run folders: written in a temp sibling and renamed into place, so nothing half-written stays.

A run folder holds the pruned checkpoint in Hugging Face layout (config, tokenizer, safetensors
shards and their index: `AutoModelForCausalLM.from_pretrained(folder)` loads it), `run.json`, and
the plots. A rerun with the same spec finds the finished folder and returns it (resume).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from orchestrator.shard import write_index

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def save_checkpoint(session, folder: Path) -> None:
    """Each shard writes its tensors; the driver writes the index, config and tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = [session.chain.get(session.chain.call(i, "save", str(folder))) for i in range(session.chain.n_shards)]
    total = sum((folder / f).stat().st_size for f in {f for m in maps for f in m.values()})
    write_index(folder, maps, total)
    for name in _COPY:
        src = session.model_dir / name
        if src.exists():
            shutil.copy2(src, folder / name)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(obj):
    import numpy as np
    import torch

    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_run(folder: Path) -> dict | None:
    path = folder / RUN_JSON
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is unreadable; the run will be redone", path)
        return None


class RunFolder:
    """Context manager: yields a temp folder; on success it is renamed to `final`, else removed."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.rename(self.final, old)
            os.rename(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)
        return False
