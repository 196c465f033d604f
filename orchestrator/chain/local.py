"""The chain of shards held in this process: every call runs to completion when it is submitted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.chain.interface import Chain
from orchestrator.chain.streams import num_returns


@dataclass
class Done:
    """A finished in-process call (the local chain's handle)."""

    value: Any


class LocalChain(Chain):
    """Shards held in this process. `shards` are `Shard`s (or any objects with its method names)."""

    in_process = True
    parallel = False

    def __init__(self, shards: Sequence[Any], *, block_major: bool = False):
        self.shards = list(shards)
        self.n_shards = len(self.shards)
        self.block_major = block_major

    @staticmethod
    def _resolve(args):
        return [a.value if isinstance(a, Done) else a for a in args]

    def call(self, shard: int, method: Callable, *args):
        out = getattr(self.shards[shard], method.__name__)(*self._resolve(args))
        return tuple(Done(v) for v in out) if num_returns(method) > 1 else Done(out)

    configure = call  # in-process shards never restart: nothing to replay

    def set_progress(self, callback) -> None:
        for shard in self.shards:
            shard.on_block = callback

    def wait(self, handles):
        return list(handles)

    def get(self, handle):
        return handle.value if isinstance(handle, Done) else handle

    def check_plugins(self, names: dict[str, str]) -> None:
        """Nothing to check: the shards import plug-ins in this process, where they were resolved."""

    def release(self) -> None:
        """Nothing to free: the shards' devices are this process's."""

    def close(self) -> None:
        """Nothing to stop."""
