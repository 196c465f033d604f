"""The one place Ray is started, joined and stopped, and what it retries.

Without an address (`--address` / `RAY_ADDRESS`) a local Ray instance starts inside this process
(dashboard on 127.0.0.1 only; Ray's token authentication stays as Ray configures it). With one, the
address is checked in seconds before Ray's own minutes of retries. Callers hold Ray for a block
(`ray_instance`: a grid, zero-shot without shards) or for a session's life (`executors.RayExecutor`):
whoever started the instance stops it, a joined cluster is left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

from neuroal.errors import NeuroalError, SpecError

logger = logging.getLogger(__name__)

RAY_WAIT_ENV = "NEUROAL_RAY_WAIT_S"  # how long a Ray address may take to answer (default 15 s)
RAY_WAIT_S = 15.0
# A head that answers can still fail a join: Ray's driver-side join (GCS client, then this host's raylet) times
# out on a busy head (seen in CI: a job's driver on a loaded 2-core machine). Such a failure comes with a cause;
# it is tried again. "auto" with no cluster and unparseable addresses come without one and fail at once.
JOIN_ATTEMPTS = 3
JOIN_PAUSE_S = 2.0


class RayUnavailable(NeuroalError):
    """`--address` (or $RAY_ADDRESS) names a Ray cluster that does not answer, or no cluster at all."""


def _named(address: str) -> str:
    """The address as the user gave it, saying so when it came from $RAY_ADDRESS."""
    return f"{address} (from $RAY_ADDRESS)" if os.environ.get("RAY_ADDRESS") == address else address


def _instead(address: str) -> str:
    unset = " and unset RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") == address else ""
    return f"or leave out --address{unset} to run on a local Ray instance"


def _root_cause(exc: BaseException) -> str:
    """The innermost cause, on one line: Ray wraps the reason a join failed in a generic message."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    head, traceback, _ = text.partition("Traceback (most recent call last)")
    if traceback:  # "Failed to connect to GCS. Last connection error: Traceback …": the traceback's last line says why
        return f"{head.strip().rstrip(':').strip()}: {text.splitlines()[-1].strip()}"
    return " ".join(text.split()) if len(text) <= 400 else text.splitlines()[0]  # a version mismatch spans 6 lines


def check_address(address: str, wait_s: float | None = None) -> None:
    """Wait, at most `wait_s` ($NEUROAL_RAY_WAIT_S, default 15 s), until something listens at a Ray address.

    `ray.init` on an address where nothing listens retries for many minutes; a TCP connect says in
    seconds. `auto` and addresses with another scheme are left to Ray.

    Raises:
        RayUnavailable: nothing answers at `address`, or it is a dashboard (http://) address.
        SpecError: `address` is not host:port.
    """
    text = address.strip()
    if text.startswith(("http://", "https://")):
        raise RayUnavailable(
            f"--address: {_named(text)} is a dashboard (job submission) address, not a cluster's; give the head's "
            f"address (host:6379, or ray://host:10001), or run the command on the cluster with "
            f"`ray job submit --address {text} -- neuroal ...`, {_instead(text)}")
    client = text.startswith("ray://")
    inner = text.removeprefix("ray://")
    if text == "auto" or "://" in inner:
        return
    host, _, port_text = inner.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port_text.isdigit():
        raise SpecError("--address", text, "host:port of the head (e.g. 10.0.0.1:6379), ray://host:10001, or auto")
    port = int(port_text)
    wait_s = float(os.environ.get(RAY_WAIT_ENV, RAY_WAIT_S)) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.5, min(3.0, deadline - time.monotonic()))):
                return
        except socket.gaierror:
            why = f"unknown host {host!r}"
        except ConnectionRefusedError:
            why = "connection refused"
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    start = "`ray start --head`" if client or port == 6379 else f"`ray start --head --port {port}`"
    raise RayUnavailable(f"--address: no Ray cluster answers at {_named(text)} ({why}; waited {wait_s:g} s); "
                         f"start one there with {start}, {_instead(text)}")


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, or start an embedded instance; True if this call started one.

    An embedded instance is always new (`address="local"`): never a stray cluster that happens to
    run on the machine. Nothing happens if Ray is already initialised in this process.

    Raises:
        RayUnavailable: no Ray cluster answers at `address` (within `check_address`'s wait).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_address(address)
        _join(address)
        return False
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
             include_dashboard=False, logging_level=logging.WARNING)
    return True


def _join(address: str) -> None:
    """`ray.init(address)`, tried again when a join fails for a reason Ray gives (see JOIN_ATTEMPTS)."""
    import ray

    for attempt in range(1, JOIN_ATTEMPTS + 1):
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            return
        except (ConnectionError, ValueError, RuntimeError) as exc:  # also "auto" with no cluster, an address Ray
            # cannot parse, and this process's Ray or Python version not the cluster's
            why = _root_cause(exc)
            if not isinstance(exc, ConnectionError) or exc.__cause__ is None or attempt == JOIN_ATTEMPTS:
                tries = f" ({attempt} tries)" if attempt > 1 else ""
                fix = ("install the cluster's Ray and Python versions here, or run the command on the cluster with "
                       "`ray job submit -- neuroal ...`" if why.startswith("Version mismatch")
                       else "start a cluster with `ray start --head`")
                raise RayUnavailable(f"--address: cannot connect to Ray at {_named(address)}: {why}{tries}; "
                                     f"{fix}, {_instead(address)}") from exc
            logger.warning("joining Ray at %s failed (%s); trying again", address, why)
            ray.shutdown()
            time.sleep(JOIN_PAUSE_S)


@contextlib.contextmanager
def ray_instance(address: str | None, num_cpus: int | None = None):
    """Ray for the duration of the block: joined at `address`, or an embedded instance started (and
    stopped after) when there is none; nothing happens if this process already has Ray."""
    started = ensure_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            stop_ray()


def stop_ray() -> None:
    import ray

    ray.shutdown()


class TransientError(NeuroalError):
    """A failure worth retrying (out of memory on a device, a lost node): Ray retries tasks raising it."""


def transient(exc: BaseException) -> bool:
    """CUDA / host out-of-memory: another attempt (on another worker) may succeed."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))
