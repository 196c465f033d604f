"""Typed errors: each says what was expected, what came, and what to do; all survive pickling."""

from __future__ import annotations

from collections.abc import Iterable


class NeuroalError(Exception):
    """Base of every error this project raises on purpose (bad input, unsupported setup)."""


class SpecError(NeuroalError, ValueError):
    """A user-facing field has a bad value; the message names the field and the allowed values."""

    def __init__(self, field: str, value: object, allowed: str | Iterable[str]):
        if not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; allowed: {allowed}")

    def __reduce__(self):
        return (type(self), (self.field, self.value, self.allowed))


class UnsupportedArchitecture(NeuroalError):
    """The model's `config.model_type` has no family adapter."""

    def __init__(self, model_type: str, supported: Iterable[str]):
        self.model_type, self.supported = model_type, sorted(supported)
        super().__init__(
            f"model: architecture {model_type!r} is not supported; supported: {', '.join(self.supported)}"
        )

    def __reduce__(self):
        return (type(self), (self.model_type, self.supported))


class DataError(NeuroalError):
    """Calibration or evaluation data is missing, unreadable or too small for the request."""


class ModelLoadError(NeuroalError):
    """The model path or hub id cannot be read."""


class SingularHessianError(NeuroalError):
    """The layer Hessian is not positive definite even after damping (weights left untouched)."""


class StorageAccessError(NeuroalError):
    """A storage URI (`--out`, `--store`, `--model`) cannot be reached: no credentials, no such bucket,
    access denied, or an endpoint that does not answer. `where` names who tried when not this process
    (a shard on a worker node)."""

    def __init__(self, field: str, location: str, problem: str, advice: str, where: str = ""):
        self.field, self.location, self.problem, self.advice, self.where = field, location, problem, advice, where
        who = f"{where} cannot reach" if where else "cannot reach"
        super().__init__(f"{field}: {who} {location}: {problem}; {advice}")

    def __reduce__(self):
        return (type(self), (self.field, self.location, self.problem, self.advice, self.where))
