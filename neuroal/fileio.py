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
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from neuroal.errors import StorageAccessError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cache_root() -> Path:
    """Where converted models, fetched shards' files and tokenized streams are kept ($NEUROAL_CACHE)."""
    return Path(os.environ.get("NEUROAL_CACHE", Path.home() / ".cache" / "neuroal"))


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


# ---------------------------------------------------------------- storage URIs (no shared filesystem)
#
# `--out`, grid stores and `--model` may be storage URIs (s3://, gs://, anything fsspec opens); the
# credentials and endpoint come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
# GOOGLE_APPLICATION_CREDENTIALS, ...). Object stores have no rename: writers upload finished files
# and write a manifest last (`run.json`, the safetensors index), which readers take as "complete".


def is_uri(location: str | os.PathLike) -> bool:
    """True for a storage URI (s3://bucket/x), False for a local path (or file://)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def filesystem(location: str):
    """(fsspec filesystem, path inside it) for a URI or a local path."""
    import fsspec

    return fsspec.core.url_to_fs(str(location))


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` / parts, for URIs and paths alike."""
    base = str(location).rstrip("/")
    return "/".join([base, *parts]) if is_uri(base) else str(Path(base, *parts))


def exists(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    return fs.exists(path)


def put_file(local: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy a finished local file to `location`: an upload, or an atomic local copy."""
    if is_uri(location):
        fs, path = filesystem(location)
        fs.put_file(str(local), path)
        return
    with atomic_path(location) as tmp:
        shutil.copyfile(local, tmp)


def get_file(location: str, local: str | os.PathLike) -> Path:
    """Download `location` to the local path (atomically); returns it."""
    fs, path = filesystem(location)
    with atomic_path(local) as tmp:
        fs.get_file(path, str(tmp))
    return Path(local)


def read_text(location: str | os.PathLike) -> str:
    if not is_uri(location):
        return Path(location).read_text()
    fs, path = filesystem(location)
    return fs.cat_file(path).decode()


def write_text(location: str | os.PathLike, text: str) -> None:
    """Atomic for local paths; on object stores a single PUT is all-or-nothing too."""
    if not is_uri(location):
        write_text_atomic(location, text)
        return
    fs, path = filesystem(location)
    fs.pipe_file(path, text.encode())


def remove(location: str | os.PathLike) -> None:
    """Delete a file or a folder tree (missing is fine)."""
    if not is_uri(location):
        _remove(Path(location))
        return
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def listdir(location: str | os.PathLike) -> list[str]:
    """Names directly under a folder (empty when missing)."""
    if not is_uri(location):
        return sorted(p.name for p in Path(location).iterdir()) if Path(location).is_dir() else []
    fs, path = filesystem(location)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def check_folder(location: str | os.PathLike, field: str) -> None:
    """`location`, where results go, can take them: a local folder, or one that can be created there
    (its nearest existing ancestor takes a new folder), or a storage URI this process reaches
    (`check_access`).

    Raises:
        NeuroalError: one line naming `field` (`StorageAccessError` for a URI).
    """
    if is_uri(location):
        check_access(location, field)
        return
    from neuroal.errors import NeuroalError

    out = Path(location)
    if out.exists():
        if not out.is_dir():
            raise NeuroalError(f"{field}: {out} is a file; allowed: a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise NeuroalError(f"{field}: {out} is not a writable folder; choose a folder you can write")
        return
    base = next(p for p in out.absolute().parents if p.exists())
    try:  # a real try (root passes permission checks, yet /proc or a read-only mount refuse it)
        os.rmdir(tempfile.mkdtemp(prefix=".neuroal-check-", dir=base))
    except OSError as exc:
        raise NeuroalError(f"{field}: cannot create {out} ({base} is not a writable folder: {exc.strerror}); "
                           "choose a folder you can write") from None


# ---------------------------------------------------------------- can this process reach a storage URI?

ACCESS_TIMEOUT_S = 20.0  # an endpoint that swallows packets must not hold a run for minutes
_BUCKETS = {"s3", "gs", "az"}  # protocols (after _ALIASES) whose first path component is a bucket
_CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a server "
          "other than AWS",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_CONNECTION_STRING)",
}
_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}


def _protocol(location: str) -> str:
    scheme = str(location).split("://", 1)[0].lower()
    return _ALIASES.get(scheme, scheme)


def _endpoint(protocol: str) -> str:
    if protocol != "s3":
        return ""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def access_problem(location: str, exc: BaseException | None) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed access to `location`; None `exc` means it timed out."""
    protocol = _protocol(location)
    credentials = _CREDENTIALS.get(protocol, f"give the credentials the fsspec {protocol!r} backend reads")
    endpoint = _endpoint(protocol)
    at = f" at {endpoint}" if endpoint else ""
    bucket = str(location).split("://", 1)[1].split("/", 1)[0]
    name = type(exc).__name__
    if exc is None:
        return (f"the storage endpoint{at} did not answer in {ACCESS_TIMEOUT_S:.0f} s",
                "check the network" + (" and AWS_ENDPOINT_URL" if protocol == "s3" else ""))
    if "Credential" in name:  # botocore NoCredentialsError, PartialCredentialsError; google DefaultCredentialsError
        return "no credentials found", credentials
    if isinstance(exc, FileNotFoundError):
        return (f"the bucket {bucket!r} does not exist{at}",
                "create it or fix the name" + (" (AWS_ENDPOINT_URL chooses the server)" if protocol == "s3" else ""))
    if isinstance(exc, PermissionError):
        return f"access denied to {bucket!r}{at}", f"use credentials allowed to read and write it ({credentials})"
    if "EndpointConnection" in name or "Connect" in name or isinstance(exc, (ConnectionError, TimeoutError)):
        return (f"the storage endpoint{at} does not answer ({_first_line(exc)})",
                "check the network" + (" and AWS_ENDPOINT_URL" if protocol == "s3" else ""))
    return f"{name}: {_first_line(exc)}", credentials


def check_access(location: str | os.PathLike, field: str) -> None:
    """Raise `StorageAccessError` unless this process can reach the storage URI `location` (one request).

    The bucket (s3://, gs://, az://) is asked for: that tests the credentials, the endpoint and that the
    bucket exists before any work starts. Local paths and other URIs are not checked (their readers and
    writers say what is wrong).

    Args:
        field: the flag the location came from (`--out`, `--store`, `--model`), named in the message.

    Raises:
        StorageAccessError: one line naming `field`, the URI, what went wrong and the environment to set.
    """
    if not is_uri(location) or _protocol(location) not in _BUCKETS:
        return
    location = str(location)
    outcome: list = []

    def ask():
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(location, skip_instance_cache=True)  # today's environment
            fs.info(path.split("/", 1)[0])  # the bucket: one HEAD (s3) or GET (gs, az)
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=ask, daemon=True, name="neuroal-storage-check")
    worker.start()
    worker.join(ACCESS_TIMEOUT_S)
    if outcome and outcome[0] is None:
        return
    exc = outcome[0] if outcome else None
    problem, advice = access_problem(location, exc)
    raise StorageAccessError(field, location, problem, advice) from exc
