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
