"""A small name → object registry with aliases and a helpful "did you mean" error.

Shape borrowed from lm-evaluation-harness's registry: methods, solvers and allocators are
registered by decorator and chosen by name, so the CLI choices are the registry keys. A registry
made with `plugins=` also takes the user's own objects by name (`neuroal.plugins`): a
"package.module:object" path, or a short name an installed package declares as an entry point of
`group`; `adapt` turns the object into what the registry holds (or says why it cannot).

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
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from neuroal.errors import SpecError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, *, group: str | None = None, adapt: str | None = None, plugins: str = ""):
        """
        Args:
            kind: the field it fills, as errors name it ("--method").
            group: the entry-point group installed packages register short names in.
            adapt: "module:function" (imported when first needed) taking (object, name) to the entry
                this registry holds; raising `neuroal.plugins.PluginTypeError` says what is wrong.
            plugins: what a plug-in may be, in words, for the error line; empty: no plug-ins.
        """
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self.group, self._adapt, self.plugins = group, adapt, plugins
        self._resolved: dict[str, T] = {}  # plug-in name -> entry, resolved once per process
        self._origins: dict[str, Any] = {}  # plug-in name -> neuroal.plugins.Origin, found when first asked

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
        """The registered name (lower case, aliases resolved), or a plug-in's name as given.

        Raises:
            SpecError: naming the field, the built-in names, the plug-in form, and a close match.
        """
        text = name.strip()
        if self.plugins and (":" in text or text in self._resolved):
            self._plugin(text)
            return text
        key = self._aliases.get(text.lower(), text.lower())
        if key in self._items:
            return key
        if self.plugins and self.group:
            from neuroal.plugins import entry_point

            ep = entry_point(self.group, text)
            if ep is not None:
                self._plugin(ep.name)
                return ep.name
        raise SpecError(self.kind, name, self._allowed() + self._hint(text))

    def _allowed(self, reason: str = "") -> str:
        names = ", ".join(self.names() + self.plugin_names())
        if not self.plugins:
            return names
        from neuroal.plugins import PATH_FORM

        return f"{names}, or {PATH_FORM} naming {self.plugins}" + (f" ({reason})" if reason else "")

    def _hint(self, text: str) -> str:
        from neuroal.plugins import split_path

        key = text.lower()
        close = difflib.get_close_matches(key, self.names() + list(self._aliases) + self.plugin_names(), n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
        dotted = text.rpartition(".")
        if self.plugins and dotted[0] and split_path(f"{dotted[0]}:{dotted[2]}"):
            return f" (did you mean {dotted[0] + ':' + dotted[2]!r}?)"
        return ""

    def _plugin(self, name: str) -> T:
        """The entry of a plug-in name ("module:object" or an entry point), resolved once per process."""
        if name in self._resolved:
            return self._resolved[name]
        from neuroal import plugins as P

        ep = P.entry_point(self.group, name) if self.group and ":" not in name else None
        try:
            obj = ep.load() if ep is not None else P.load_object(name)
        except LookupError as exc:
            raise self._refused(name, str(exc)) from None
        except Exception as exc:  # an entry point whose module fails to import
            raise self._refused(name, f"cannot load it: {P._first_line(exc)}") from exc
        module_path, _, function = self._adapt.partition(":")
        try:
            entry = getattr(importlib.import_module(module_path), function)(obj, name)
        except P.PluginTypeError as exc:
            raise self._refused(name, f"it is {exc}") from None
        self._resolved[name] = entry
        return entry

    def _refused(self, name: str, reason: str) -> SpecError:
        err = SpecError(self.kind, name, self._allowed(reason))
        err.reason = reason  # what went wrong alone, for a shard actor's report (`PluginUnavailable`)
        return err

    def get(self, name: str) -> T:
        key = self.canonical(name)
        return self._items[key] if key in self._items else self._plugin(key)

    def origin(self, name: str):
        """The `neuroal.plugins.Origin` (distribution, version) of a plug-in name; None for a built-in."""
        key = self.canonical(name)
        if key in self._items:
            return None
        if key not in self._origins:
            from neuroal import plugins as P

            ep = P.entry_point(self.group, key) if self.group and ":" not in key else None
            module = ep.value.partition(":")[0] if ep is not None else key.partition(":")[0]
            self._origins[key] = P.origin_of(module, ep.dist if ep is not None else None)
        return self._origins[key]

    def plugin_names(self) -> list[str]:
        """Short names installed packages give through entry points (none without a group)."""
        if not (self.plugins and self.group):
            return []
        from neuroal.plugins import entry_point_names

        return [n for n in entry_point_names(self.group) if n.lower() not in self._items]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
        except SpecError:
            return False
        return True
