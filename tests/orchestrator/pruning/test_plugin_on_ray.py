"""A new top-up is one registered class: a toy one runs through `neuroal prune` with no orchestrator change."""

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from neuroal.allocation import ALLOCATORS, Allocation, Allocator
from neuroal.allocation import ratios as R
from orchestrator.cli import app


@dataclass(frozen=True)
class Ramp(Allocator):
    """Sparsity rising linearly with depth from s − spread to s + spread (mean s)."""

    spread: float = 0.2
    summary = "toy: a linear ramp by depth"

    def allocate(self, problem, evidence=None) -> Allocation:
        n = problem.n_blocks
        values = [problem.sparsity + self.spread * (2 * b / (n - 1) - 1) for b in range(n)]
        return Allocation(R.per_block(values, problem.linears), notes=["ramp by depth"])


@pytest.fixture
def ramp():
    ALLOCATORS.register("ramp")(Ramp)
    yield
    ALLOCATORS._items.pop("ramp")


def test_a_toy_allocator_runs_through_the_cli(ramp, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["prune", "--model", str(tiny_dirs["llama"]), "--top-up", "ramp", "--sparsity",
                                      "0.5", "--seqlen", "16", "--nsamples", "2", "--executor", "local", "--data-dir",
                                      str(shared_data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["top_up"] == "ramp" and run["notes"] == ["ramp by depth"]
    assert run["block_sparsity_planned"] == pytest.approx([0.3, 0.5, 0.7])
    assert run["sparsity_actual"] == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------ a user's own installed package

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"

[project.entry-points."neuroal.methods"]
{short_method} = "{mod}.methods:cubic"

[project.entry-points."neuroal.top_ups"]
{short_top_up} = "{mod}.allocators:gentle"
"""

INIT = """\
import os
from pathlib import Path

(Path({seen!r}) / f"imported-by-{{os.getpid()}}").touch()  # which processes import the package
"""

METHODS_PY = '''\
def cubic(W, stats):
    """|W|^3 * a: Wanda's score with a sharper weight term; (W, stats) without a default: needs the input norms."""
    return W.abs().float() ** 3 * stats.norms.reshape(1, -1)
'''

ALLOCATORS_PY = '''\
from dataclasses import dataclass

from neuroal.allocation import Allocation, Allocator, Evidence
from neuroal.allocation import ratios as R


@dataclass(frozen=True)
class Ramp(Allocator):
    """Sparsity rising linearly with depth from s - spread to s + spread (mean s); records each block's
    mean input norm, summarised where the block lives (on a Ray shard actor: this class travels by reference)."""

    spread: float = 0.2
    evidence = Evidence.BLOCK_STATS
    stats_kinds = frozenset({"norms"})
    summary = "a linear ramp by depth"

    def block_summary(self, weights, stats):
        return sum(float(stats[name].norms.mean()) for name in weights) / len(weights)

    def allocate(self, problem, evidence):
        n = problem.n_blocks
        values = [problem.sparsity + self.spread * (2 * b / (n - 1) - 1) for b in range(n)]
        return Allocation(R.per_block(values, problem.linears), notes=[f"ramp by depth over {len(evidence)} blocks"],
                          extra={"mean_norms": list(evidence)})


gentle = Ramp(spread=0.1)  # an instance: its knobs fixed
'''


@pytest.fixture(scope="module")
def ray_first():
    """A local Ray instance started before the package is installed: its worker processes already
    exist, so they must find a package installed after they started."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def installed(ray_first, tmp_path_factory):
    """A real package (pyproject, version 0.1.0, entry points) `pip install`ed into this environment's
    site-packages, and uninstalled at the end. Its names are unique per run, so parallel sessions
    sharing the environment never meet."""
    import importlib
    import subprocess
    import sys
    import uuid

    # built without network or build isolation: setuptools >= 70.1 builds wheels alone (torch requires >= 77)
    pytest.importorskip("setuptools", minversion="70.1")
    tag = uuid.uuid4().hex[:8]
    mod, dist = f"neuroal_toyplug_{tag}", f"neuroal-toyplug-{tag}"
    root, seen = tmp_path_factory.mktemp("toyplug"), tmp_path_factory.mktemp("imports")
    (root / "src" / mod).mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, mod=mod, short_method=f"cubic_{tag}",
                                                          short_top_up=f"ramp_{tag}"))
    (root / "src" / mod / "__init__.py").write_text(INIT.format(seen=str(seen)))
    (root / "src" / mod / "methods.py").write_text(METHODS_PY)
    (root / "src" / mod / "allocators.py").write_text(ALLOCATORS_PY)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "--no-index", str(root)], check=True)
    importlib.invalidate_caches()
    try:
        yield {"mod": mod, "dist": dist, "tag": tag, "seen": seen}
    finally:
        subprocess.run(pip + ["uninstall", "-y", dist], check=True)
        for name in [m for m in sys.modules if m == mod or m.startswith(mod + ".")]:
            del sys.modules[name]


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.ray
def test_an_installed_packages_method_and_top_up_prune_on_ray_shards_as_in_process(installed, tiny_dirs, shared_data,
                                                                                   tmp_path, monkeypatch):
    """`--method pkg.mod:cubic --top-up pkg.mod:Ramp` on 2 Ray shard actors: the actors import the package
    themselves (the method by name, the top-up's block summary by reference to its class), run.json and
    the store record name and version, and the masks and weights equal the in-process run's. Short
    names from the package's entry points work too (the top-up's an instance)."""
    import os

    import torch

    from orchestrator import api
    from orchestrator.results.store import read_store

    mod, tag = installed["mod"], installed["tag"]
    store = tmp_path / "store"
    monkeypatch.setenv("NEUROAL_STORE", str(store))
    common = ["--model", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--seqlen", "16", "--nsamples", "4",
              "--data-dir", str(shared_data)]
    method, top_up = f"{mod}.methods:cubic", f"{mod}.allocators:Ramp"
    result = CliRunner().invoke(app, ["prune", *common, "--method", method, "--top-up", top_up, "--executor", "ray",
                                      "--shards", "2", "--out", str(tmp_path / "ray")])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert (run["spec"]["method"], run["spec"]["top_up"]) == (method, top_up)
    assert run["plugins"] == {installed["dist"]: "0.1.0"}
    assert len(run["shards"]) == 2 and run["notes"] == ["ramp by depth over 3 blocks"]
    assert run["block_sparsity_planned"] == pytest.approx([0.3, 0.5, 0.7])
    actors = {p.name for p in installed["seen"].iterdir()} - {f"imported-by-{os.getpid()}"}
    assert len(actors) >= 2, actors  # both shard actors imported the package in their own processes

    kw = dict(sparsity=0.5, seqlen=16, nsamples=4, data_dir=str(shared_data), executor="local")
    local = api.prune(str(tiny_dirs["llama"]), method=method, top_up=top_up, out=str(tmp_path / "local"), **kw)
    a, b = _weights(tmp_path / "ray"), _weights(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert local.sparsity_actual == pytest.approx(run["sparsity_actual"]) == pytest.approx(0.5, abs=0.02)
    assert local.data["allocation_extra"] == run["allocation_extra"] and len(run["allocation_extra"]["mean_norms"]) == 3
    assert local.cell_key == run["cell_key"] and local.plugins == run["plugins"]

    short = api.prune(str(tiny_dirs["llama"]), method=f"cubic_{tag}", top_up=f"RAMP_{tag}", out=str(tmp_path / "short"),
                      **kw)
    assert (short.method, short.top_up, short.plugins) == (f"cubic_{tag}", f"ramp_{tag}", run["plugins"])
    assert short["block_sparsity_planned"] == pytest.approx([0.4, 0.5, 0.6])  # the instance's spread, 0.1

    rows = [r for r in read_store(store).table.to_pylist() if r["task"] == "prune"]
    # the Ray and the in-process run are one cell (same key): one row; the short names are another cell
    assert sorted((r["method"], r["top_up"]) for r in rows) == sorted([(method, top_up), (f"cubic_{tag}", f"ramp_{tag}")])
    assert all(json.loads(r["plugins"]) == {installed["dist"]: "0.1.0"} for r in rows)


def test_a_plugins_version_joins_the_cell_key(installed, tmp_path):
    """A new version of a plug-in never reuses the old one's results; built-in keys are as before. A grid
    names plug-ins as the flags do."""
    from neuroal.methods import METHODS
    from neuroal.plugins import Origin
    from orchestrator.grid import expand, load_grid
    from orchestrator.spec import build_spec

    (tmp_path / "grid.yaml").write_text(f"name: mine\nmodels: [m]\nmethods: [wanda, {installed['mod']}.methods:cubic]\n"
                                        f"top_ups: [ramp_{installed['tag']}]\nsparsities: [0.5]\n")
    cells = expand(load_grid(tmp_path / "grid.yaml"), tmp_path).cells
    assert [(c.spec.method, c.spec.top_up) for c in cells] == [("wanda", f"ramp_{installed['tag']}"),
                                                                (f"{installed['mod']}.methods:cubic",
                                                                 f"ramp_{installed['tag']}")]

    name = f"{installed['mod']}.methods:cubic"
    spec = build_spec(model="m", method=name, top_up="uniform")
    before = spec.cell_key()
    assert spec.plugins() == {installed["dist"]: "0.1.0"}
    METHODS._origins[name] = Origin(installed["dist"], "0.2.0")
    try:
        assert spec.cell_key() != before
    finally:
        METHODS._origins[name] = Origin(installed["dist"], "0.1.0")
    assert build_spec(model="m").plugins() == {}
    assert build_spec(model="m").default_out() == "runs/m-wanda-uniform-0.5-unstructured"
    assert ":" not in spec.default_out()


@pytest.mark.ray
def test_a_shard_actor_that_cannot_import_the_plugin_stops_the_run_in_one_line(ray_first, tiny_dirs, shared_data,
                                                                              tmp_path, monkeypatch):
    """A module only the driver can import (on its sys.path, installed on no worker): the shards say so,
    naming the field, the shard and its node, before any work or any file."""
    import uuid

    mod = f"driver_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{mod}.py").write_text(METHODS_PY)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    result = CliRunner().invoke(app, ["prune", "--model", str(tiny_dirs["llama"]), "--method", f"{mod}:cubic",
                                      "--seqlen", "16", "--nsamples", "4", "--data-dir", str(shared_data),
                                      "--executor", "ray", "--shards", "2", "--out", str(tmp_path / "run")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert errors[0].startswith(f"error: --method: shard 0 on node ") and (
        f"cannot load '{mod}:cubic' (cannot import '{mod}': ModuleNotFoundError: No module named '{mod}'); "
        "install the package on every node") in errors[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_a_shard_with_another_version_of_the_plugin_is_refused():
    from neuroal.errors import NeuroalError
    from neuroal.plugins import check_found, resolve_here

    names = {"--method": "neuroal.scores:wanda"}  # a score named by path: a plug-in from the neuroal package
    here = resolve_here(names)
    assert here["--method"][0] == "neuroal"
    check_found(names, here, "shard 0 on node 10.0.0.1")
    with pytest.raises(NeuroalError, match=r"^--method: shard 1 on node 10\.0\.0\.2 has neuroal 0\.0\.0, this process "
                                           r"neuroal .*; install the same version on every node$"):
        check_found(names, {"--method": ("neuroal", "0.0.0")}, "shard 1 on node 10.0.0.2")
