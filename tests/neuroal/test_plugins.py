"""What a plug-in name may resolve to (`neuroal.plugins`): the registry table of accepted objects and
refusals, each refusal one line naming the field."""

from __future__ import annotations

import pytest
import torch

from neuroal.allocation import ALLOCATORS, Allocator
from neuroal.allocation.owl import OWL
from neuroal.errors import SpecError
from neuroal.methods import METHODS, Method, prune_linear
from neuroal.plugins import FixedAllocator, split_path
from neuroal.stats import HESSIAN, NORMS, LinearStats

USER_MODULE = '''
from neuroal.allocation.owl import OWL
from neuroal.methods import METHODS, Method

def weights_only(W):
    return W.abs()

def declared(W, stats):
    return W.abs()
declared.needs = {"hessian"}

def misdeclared(W, stats):
    return W.abs()
misdeclared.needs = {"gradients"}

def nothing():
    return 0

solver = METHODS.get("sparsegpt")
owl_strict = OWL(m=7.0)
number = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    import sys
    import uuid

    name = f"user_plugins_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("path,needs", [
    ("neuroal.scores:magnitude", frozenset()),  # (W, stats=None): needs nothing
    ("neuroal.scores:wanda", frozenset({NORMS})),  # (W, stats): the input norms
    ("neuroal.scores:multiflow", frozenset({NORMS})),
])
def test_a_score_function_by_path_prunes_as_the_builtin(path, needs):
    method = METHODS.get(path)
    assert isinstance(method, Method) and method.name == path and method.needs == needs
    torch.manual_seed(0)
    W = torch.randn(6, 16)
    stats = LinearStats(scaler_row=torch.rand(16), n_windows=1)
    builtin = METHODS.get(path.split(":")[1])
    assert torch.equal(prune_linear(W, stats, 0.5, method), prune_linear(W, stats, 0.5, builtin))
    assert METHODS.origin(path).distribution == "neuroal" and METHODS.origin("wanda") is None


def test_what_a_user_module_may_name(user_module):
    m = user_module
    only = METHODS.get(f"{m}:weights_only")
    assert only.needs == frozenset() and torch.equal(only.score(torch.tensor([[-2.0, 1.0]]), None),
                                                     torch.tensor([[2.0, 1.0]]))
    assert METHODS.get(f"{m}:declared").needs == frozenset({HESSIAN})
    assert METHODS.get(f"{m}:solver") is METHODS.get("sparsegpt")  # a Method as it is
    assert ALLOCATORS.get(f"{m}:OWL") is OWL
    fixed = ALLOCATORS.get(f"{m}:owl_strict")
    assert isinstance(fixed, FixedAllocator) and fixed.from_fields({"owl_m": 5.0}) == OWL(m=7.0)
    assert fixed.evidence == OWL.evidence and fixed.supports_nm is False
    assert METHODS.canonical(f" {m}:weights_only ") == f"{m}:weights_only"


@pytest.mark.parametrize("field,name,reason", [
    ("method", "{m}:misdeclared", "(it is a score function whose needs hold ['gradients']; expected some of norms"),
    ("method", "{m}:nothing", "(it is a callable that takes no arguments"),
    ("method", "{m}:number", "(it is an int; expected a neuroal.methods.Method or a score function"),
    ("method", "{m}:OWL", "(it is class OWL; expected"),
    ("method", "{m}:weights_onyl", "has no attribute 'weights_onyl'; did you mean 'weights_only'?)"),
    ("top_up", "{m}:weights_only", "(it is a function; expected a subclass of neuroal.allocation.Allocator"),
    ("top_up", "{m}:solver", "(it is a Method; expected a subclass"),
    ("top_up", "{m}:number", "(it is an int; expected a subclass"),
])
def test_what_a_user_module_may_not_name(user_module, field, name, reason):
    registry, flag = (METHODS, "--method") if field == "method" else (ALLOCATORS, "--top-up")
    name = name.format(m=user_module)
    with pytest.raises(SpecError) as err:
        registry.get(name)
    text = str(err.value)
    assert text.startswith(f"{flag}: got {name!r}; allowed: ") and reason in text and "\n" not in text


def test_the_path_form():
    assert split_path("a.b:c") == ("a.b", "c") and split_path("a:b.c") == ("a", "b.c")
    for bad in ("a.b.c", "a:", ":b", "a:b:c", "a b:c", "a.b:c d"):
        assert split_path(bad) is None, bad
    assert not issubclass(FixedAllocator, Allocator)  # stands in the registry, never allocates itself
