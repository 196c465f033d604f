"""Atomic local writes: build a file or a folder under a temporary sibling name, then rename it.

A reader, or a rerun after a crash, sees the old content or the new one, never half of either.
One helper for every writer (run folders, checkpoints, the results store, caches, benchmarks).

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_path(root / "a.txt") as tmp:
...     _ = tmp.write_text("done")
>>> (root / "a.txt").read_text(), sorted(p.name for p in root.iterdir())
('done', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, payload, *, default=None) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=default))


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, replace: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder; on success it becomes `final`.

    Args:
        replace: an existing `final` is replaced (a rerun's new result); otherwise the first
            writer wins and a later one's folder is discarded (caches built by racing processes).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.exists() and replace:
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            _remove(tmp)
            raise
        _remove(tmp)  # another process finished first: keep theirs
