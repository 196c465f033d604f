"""Cheap guards: the layering rules, the orchestrator's shape, and the doctests of small utilities."""

import ast
import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_neuroal_never_imports_ray():
    code = ("import sys, neuroal, neuroal.block, neuroal.data, neuroal.allocation.ratios, neuroal.zeroshot, "
            "neuroal.solvers.apt, neuroal.plugins; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["neuroal.registry", "neuroal.allocation.schedule", "orchestrator.chain.streams",
                                    "orchestrator.chain.wire", "neuroal.fileio", "orchestrator.planning.sizes", "orchestrator.planning.partition",
                                    "orchestrator.planning.offloaded", "neuroal.plugins"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- the orchestrator's shape

ORCHESTRATOR = Path(__file__).resolve().parents[1] / "orchestrator"


def _rooms() -> dict[str, set[str]]:
    """orchestrator's rooms (top-level modules and folders) and the rooms each imports."""
    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {}
    for path in ORCHESTRATOR.rglob("*.py"):
        parts = path.relative_to(ORCHESTRATOR.parent).with_suffix("").parts
        here = room(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        deps = out.setdefault(here, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "orchestrator":
                names = [f"orchestrator.{a.name}" for a in node.names]
            deps.update(room(n) for n in names if n.startswith("orchestrator.") and room(n) != here)
    return out


def test_the_orchestrators_rooms_import_one_way_on_at_most_8_floors():
    """Folders are the parts (chain, evaluation, results, pruning, planning); imports between rooms form
    no cycle, and the longest chain of rooms is at most 8 (entry on top, planning at the bottom)."""
    rooms = _rooms()
    floors: dict[str, int] = {}

    def floor(r: str, path: tuple = ()) -> int:
        assert r not in path, f"import cycle: {' -> '.join(path + (r,))}"
        if r not in floors:
            floors[r] = 1 + max((floor(d, path + (r,)) for d in rooms.get(r, ())), default=0)
        return floors[r]

    assert max(floor(r) for r in rooms) <= 8, floors
    assert {"orchestrator.chain", "orchestrator.evaluation", "orchestrator.results", "orchestrator.pruning"} <= set(rooms)


def test_no_caller_probes_the_chain_or_compares_executor_and_offload_strings():
    """The chain is used through its declared interface (`orchestrator.chain.Chain`): no `getattr` of a
    chain or session member; "--executor" and "--offload" strings are read where the chain is built."""
    construction = {"chain/executors.py", "chain/session.py", "chain/shard.py", "planning/offloaded.py", "spec.py",
                    "api.py", "cli.py"}  # where the strings are read: the flags, and the one rule for each
    probe = re.compile(r"getattr\((self\.)?(session|chain|session\.chain)\b")
    compare = re.compile(r"""(executor|offload)\s*[!=]=\s*["']""")
    found = []
    for path in ORCHESTRATOR.rglob("*.py"):
        rel = path.relative_to(ORCHESTRATOR).as_posix()
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if probe.search(line) or (compare.search(line) and rel not in construction):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
