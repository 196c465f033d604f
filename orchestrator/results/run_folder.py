"""A run's output folder: local, or a storage URI on a cluster with no shared filesystem.

- Local `--out`: the folder is built in a temporary sibling and renamed into place when complete.
- URI `--out` (s3://, gs://, ...): object stores have no rename, so files are uploaded in place and
  `run.json` is written last: a folder is complete when it has a `run.json` (the manifest), and the
  checkpoint's `model.safetensors.index.json` is written after every shard file. A `_run_key` marker
  written first lets a rerun of the same spec resume an interrupted folder.
- Shards write their tensors straight to a URI `--out` (no 140 GB through the head) and, in
  process, straight to a local one; Ray actors with a local `--out` stream their file to the driver,
  which may be on another node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from neuroal import fileio
from neuroal.errors import NeuroalError

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
KEY_MARKER = "_run_key"
INDEX = "model.safetensors.index.json"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def _jsonable(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(run: dict) -> str:
    return json.dumps(run, indent=2, default=_jsonable)


def read_run(folder: str | Path) -> dict | None:
    """The run.json of a complete run folder (local or URI), or None."""
    path = fileio.join(folder, RUN_JSON)
    if not fileio.exists(path):
        return None
    try:
        return json.loads(fileio.read_text(path))
    except json.JSONDecodeError:
        logger.warning("%s is unreadable; the run will be redone", path)
        return None


class RunOutput:
    """Where one run's folder goes, and where its shards keep resume checkpoints meanwhile."""

    def __init__(self, out: str | Path, key: str):
        self.out, self.key = str(out), key
        self.remote = fileio.is_uri(self.out)

    @property
    def resume_location(self) -> str:
        if self.remote:
            return fileio.join(self.out, f"_partial-{self.key}")
        p = Path(self.out)
        return str(p.parent / f".{p.name}.partial-{self.key}")

    def previous(self) -> dict | None:
        run = read_run(self.out)
        return run if run is not None and run.get("cell_key") == self.key else None

    def check_free(self, overwrite: bool) -> None:
        """Refuse to write over another run or over the user's own files (an interrupted folder of
        this same spec is resumed). Whether `--out` can be written at all is `fileio.check_folder`."""
        names = fileio.listdir(self.out)
        ours = [n for n in names if n in (RUN_JSON, KEY_MARKER, INDEX) or n.startswith("_partial-")]
        if not names or (overwrite and ours):
            return
        marker = fileio.join(self.out, KEY_MARKER)
        if self.remote and KEY_MARKER in names and fileio.read_text(marker).strip() == self.key:
            return
        if not ours:  # never replaced, --overwrite or not: these are not ours to delete
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise NeuroalError(f"--out: {self.out} holds {len(names)} file(s) that are not a neuroal run ({shown}); "
                               "choose an empty or new folder")
        raise NeuroalError(f"--out: {self.out} holds another run; choose another folder or pass --overwrite")

    @contextlib.contextmanager
    def writing(self, overwrite: bool) -> Iterator[str]:
        """Yield the location to write into; on success the folder is complete (renamed, or run.json last)."""
        if not self.remote:
            with fileio.atomic_dir(self.out, replace=True) as tmp:
                yield str(tmp)
            return
        if overwrite:
            for name in fileio.listdir(self.out):
                if not name.startswith("_partial-"):
                    fileio.remove(fileio.join(self.out, name))
        fileio.write_text(fileio.join(self.out, KEY_MARKER), self.key)
        yield self.out

    def finish(self, location: str, run: dict) -> None:
        """Write run.json, the manifest, last; drop the resume checkpoints."""
        fileio.write_text(fileio.join(location, RUN_JSON), to_json(run))
        if self.remote:
            fileio.remove(fileio.join(self.out, KEY_MARKER))
        fileio.remove(self.resume_location)

    def put_local_folder(self, folder: Path, location: str) -> None:
        """Upload the files of a local folder (plots) into the run folder."""
        for p in sorted(folder.iterdir()):
            if p.is_file():
                fileio.put_file(p, fileio.join(location, p.name))


def local_checkpoint(location: str) -> tuple[Path, object]:
    """A local folder holding the checkpoint at `location` (downloaded when it is a URI), and a cleanup."""
    if not fileio.is_uri(location):
        from neuroal.models import resolve_model

        return (Path(location) if Path(location).exists() else resolve_model(location)), None
    tmp = tempfile.TemporaryDirectory(prefix="neuroal-ckpt-")
    for name in fileio.listdir(location):
        if not name.startswith("_") and "." in name:
            fileio.get_file(fileio.join(location, name), Path(tmp.name) / name)
    return Path(tmp.name), tmp
