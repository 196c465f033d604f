"""Out-of-memory on a device or the host is a transient failure: Ray retries it, the store records it."""

import pytest
import torch

from orchestrator.evaluate import TransientError, transient
from orchestrator.grid import eval_cell


def test_out_of_memory_is_transient():
    assert transient(torch.OutOfMemoryError("CUDA out of memory")) and transient(MemoryError())
    assert not transient(RuntimeError("shape mismatch")) and not transient(ValueError())


def test_an_evaluation_that_runs_out_of_memory_raises_the_retried_error(tmp_path, monkeypatch):
    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("orchestrator.evaluate.zeroshot", oom)
    with pytest.raises(TransientError, match="out of memory evaluating arc_easy"):
        eval_cell(str(tmp_path), "zeroshot", "arc_easy", 32, None, None, 4)
