"""Methods and top-ups from the user's own installed package, found by name.

`--method package.module:object` and `--top-up package.module:object` (also in grid YAMLs and the
Python API) name an object in any importable module; an installed package may also give short names
through entry points (groups `neuroal.methods`, `neuroal.top_ups`):

```toml
[project.entry-points."neuroal.methods"]
cubic = "mypkg.methods:cubic"
```

What the object may be:

- `--method`: a `neuroal.methods.Method` (any score or solver), or a score function
  `(W [out, in], stats) -> scores [out, in]` (higher = keep), wrapped into a `Method`. Its `needs`
  (the statistics the calibration pass keeps) come from a `needs` attribute on the function (e.g.
  `{"norms"}`, `{"hessian"}`, or `()`), else from its signature: `(W)` or `(W, stats=None)` needs
  nothing (magnitude-like, no calibration pass), `(W, stats)` needs the input norms (`stats.norms`,
  Wanda-like).
- `--top-up`: an `Allocator` subclass (its knobs read from the spec as the built-ins'), or an
  `Allocator` instance (its knobs fixed as given).

Only the name crosses to Ray actors; every process resolves it with the same function
(`Registry.get`), so a shard actor imports the package where it runs (it must be installed on every
node, as any dependency). The driver records the package's distribution and version
(`Registry.origin`): `run.json` and the results store name the plug-in and its version, and a
cell's key covers both, so a new version of a plug-in is never served stale results.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from neuroal.errors import NeuroalError, SpecError

logger = logging.getLogger(__name__)

PATH_FORM = "package.module:object"


class PluginTypeError(TypeError):
    """The named object is not something the registry takes; the message says what it is."""


class PluginUnavailable(NeuroalError):
    """A shard actor cannot load a plug-in the driver could, or loads another version of it."""


def registries() -> dict:
    """Field -> the registry that takes plug-ins for it."""
    from neuroal.allocation import ALLOCATORS
    from neuroal.methods import METHODS

    return {"--method": METHODS, "--top-up": ALLOCATORS}


def plugin_names(method: str, top_up: str) -> dict[str, str]:
    """{field: name} of the plug-ins among a method and a top-up (empty when both are built in)."""
    return {f: n for f, n in (("--method", method), ("--top-up", top_up)) if registries()[f].origin(n) is not None}


def resolve_here(names: dict[str, str]) -> dict[str, tuple[str, str | None] | str]:
    """Resolve plug-in names in this process (a shard actor): {field: (distribution, version)}, or the
    reason it cannot load one."""
    out: dict[str, tuple[str, str | None] | str] = {}
    for field, name in names.items():
        try:
            origin = registries()[field].origin(name)  # imports the plug-in here
        except SpecError as exc:
            out[field] = getattr(exc, "reason", str(exc))
            continue
        out[field] = (origin.distribution, origin.version) if origin is not None else ("built in", None)
    return out


def check_found(names: dict[str, str], found: dict, where: str) -> None:
    """Raise `PluginUnavailable` unless `found` (`resolve_here` on a shard) matches this process's plug-ins.

    >>> check_found({}, {}, "shard 0")
    """
    for field, name in names.items():
        got = found[field]
        if isinstance(got, str):
            raise PluginUnavailable(f"{field}: {where} cannot load {name!r} ({got}); install the package on every "
                                    "node of the cluster (as any dependency)")
        mine = registries()[field].origin(name)
        if tuple(got) != (mine.distribution, mine.version):
            raise PluginUnavailable(f"{field}: {where} has {got[0]} {got[1]}, this process {mine.distribution} "
                                    f"{mine.version}; install the same version on every node")


def split_path(path: str) -> tuple[str, str] | None:
    """'pkg.mod:obj' -> ('pkg.mod', 'obj'); None when it is not of that form.

    >>> split_path("mypkg.methods:cubic"), split_path("mypkg.methods.cubic"), split_path(":x")
    (('mypkg.methods', 'cubic'), None, None)
    """
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr or ":" in attr:
        return None
    if not all(part.isidentifier() for part in module.split(".")) or not all(p.isidentifier() for p in attr.split(".")):
        return None
    return module, attr


def import_module(module: str):
    """Import `module`; a miss is retried once after `importlib.invalidate_caches()`: a long-lived process
    (a Ray worker started before the package was installed) may hold stale directory listings."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        importlib.invalidate_caches()
        return importlib.import_module(module)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_object(path: str) -> Any:
    """The object a 'package.module:object' path names.

    Raises:
        LookupError: the module cannot be imported or lacks the attribute (the message says which).
    """
    module_name, attr = split_path(path) or (None, None)
    if module_name is None:
        raise LookupError(f"not of the form {PATH_FORM}")
    try:
        obj = import_module(module_name)
    except Exception as exc:  # the user's module failed to import: say why in one line
        raise LookupError(f"cannot import {module_name!r}: {_first_line(exc)}") from exc
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module_name, *attr.split(".")[:i]])
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LookupError(f"{where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def entry_point(group: str, name: str) -> md.EntryPoint | None:
    """The entry point `name` (case-insensitive) of `group`, None if no installed package gives one."""
    key = name.strip().lower()
    for ep in md.entry_points(group=group):
        if ep.name.lower() == key:
            return ep
    return None


def entry_point_names(group: str) -> list[str]:
    return sorted({ep.name for ep in md.entry_points(group=group)})


@dataclass(frozen=True)
class Origin:
    """Where a plug-in comes from: the installed distribution and its version (None: the module is
    importable but belongs to no installed distribution, so no version tells its changes apart)."""

    distribution: str
    version: str | None


def origin_of(module: str, dist: md.Distribution | None = None) -> Origin:
    """The installed distribution that provides `module` (or `dist`, an entry point's), with its version."""
    if dist is not None:
        return Origin(dist.metadata["Name"], dist.version)
    top = module.split(".")[0]
    names = md.packages_distributions().get(top) or []
    if names:
        name = names[0]
        return Origin(md.distribution(name).metadata["Name"], md.version(name))
    logger.warning("plug-in module %r is not part of an installed distribution: no version is recorded, and a "
                   "changed plug-in cannot be told apart from the old one in results", module)
    return Origin(top, None)


# ------------------------------------------------------------------ what a registry takes


def _what(obj: Any) -> str:
    """'class Foo', 'a function', 'an int': what a named object is, for an error line."""
    if isinstance(obj, type):
        return f"class {obj.__name__}"
    noun = type(obj).__name__
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


class _WeightsOnly:
    """A score function of the weights alone, `f(W)`, called as `(W, stats)` (picklable by reference)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, W, stats=None):
        return self.fn(W)

    def __repr__(self) -> str:
        return f"_WeightsOnly({self.fn!r})"


def _score_needs(fn) -> tuple[frozenset, bool]:
    """(stats kinds, whether it takes only W) of a score function: its `needs` attribute, else its signature."""
    from neuroal import stats as S

    known = (S.NORMS, S.MOMENTS, S.HESSIAN, S.HESSIAN_NORMS)
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = None
    if params is not None and not params:
        raise PluginTypeError("a callable that takes no arguments; expected a score function (W, stats) -> scores")
    weights_only = params is not None and len(params) == 1
    declared = getattr(fn, "needs", None)
    if declared is not None:
        kinds = frozenset([declared] if isinstance(declared, str) else declared)
        unknown = sorted(k for k in kinds if k not in known)
        if unknown:
            raise PluginTypeError(f"a score function whose needs hold {unknown}; expected some of {', '.join(known)}")
        return kinds, weights_only
    if weights_only or (params is not None and params[1].default is not inspect.Parameter.empty):
        return frozenset(), weights_only
    return frozenset({S.NORMS}), False


def as_method(obj: Any, name: str):
    """A `Method` from what a `--method` plug-in names (see the module docstring).

    Raises:
        PluginTypeError: neither a `Method` nor a score function.
    """
    from neuroal.methods import Method

    if isinstance(obj, Method):
        if (obj.score is None) == (obj.solver is None):
            raise PluginTypeError("a Method with both or neither of score and solver; expected exactly one")
        return obj
    if callable(obj) and not isinstance(obj, type):
        needs, weights_only = _score_needs(obj)
        return Method(name, needs, score=_WeightsOnly(obj) if weights_only else obj)
    raise PluginTypeError(f"{_what(obj)}; expected a neuroal.methods.Method or a score function "
                          "(W, stats) -> scores")


class FixedAllocator:
    """An `Allocator` instance named as a `--top-up`: it stands where the registry holds a class, and
    `from_fields` gives the instance itself (its knobs are fixed as the plug-in made it)."""

    def __init__(self, instance):
        self.instance = instance
        self.knobs = {}

    def from_fields(self, fields):
        return self.instance

    def __getattr__(self, name: str):  # evidence, supports_nm, refiner, stats_kinds, summary, check
        return getattr(type(self.instance), name)


def as_allocator(obj: Any, name: str):
    """The registry's entry for what a `--top-up` plug-in names: an `Allocator` subclass, or an instance.

    Raises:
        PluginTypeError: neither.
    """
    from neuroal.allocation.base import Allocator, Evidence

    cls = obj if isinstance(obj, type) else type(obj)
    if not issubclass(cls, Allocator) or cls is Allocator:
        raise PluginTypeError(f"{_what(obj)}; expected a subclass of neuroal.allocation.Allocator or an instance of one")
    if not isinstance(cls.evidence, Evidence):
        raise PluginTypeError(f"an Allocator whose evidence is {cls.evidence!r}; expected a neuroal.allocation.Evidence")
    return obj if isinstance(obj, type) else FixedAllocator(obj)
