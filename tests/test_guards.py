"""Cheap guards: the layering rule, and the doctests of small utilities."""

import doctest
import importlib
import subprocess
import sys

import pytest


def test_neuroal_never_imports_ray():
    code = ("import sys, neuroal, neuroal.block, neuroal.data, neuroal.allocation.ratios, neuroal.zeroshot, "
            "neuroal.solvers.apt, neuroal.plugins; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["neuroal.registry", "neuroal.allocation.schedule", "orchestrator.pipeline",
                                    "orchestrator.wire", "neuroal.fileio", "orchestrator.planning.sizes", "orchestrator.planning.partition",
                                    "orchestrator.planning.offloaded", "neuroal.plugins"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
