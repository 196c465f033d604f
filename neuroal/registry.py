"""A small name → object registry with aliases and a helpful "did you mean" error.

Shape borrowed from lm-evaluation-harness's registry: methods, solvers and allocators are
registered by decorator and chosen by name, so the CLI choices are the registry keys.

>>> R = Registry("colour")
>>> @R.register("red", "rouge")
... def red(): return "r"
>>> R.get("rouge")()
'r'
>>> R.names()
['red']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from neuroal.errors import SpecError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return deco

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items) + list(self._aliases), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(self.kind, name, self.names() if not hint else ", ".join(self.names()) + hint)
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
        except SpecError:
            return False
        return True
