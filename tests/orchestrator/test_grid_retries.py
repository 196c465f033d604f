"""Out-of-memory on a device or the host is a transient failure: Ray retries it, the store records it."""

import pytest
import torch

from orchestrator.chain.ray_runtime import TransientError, transient
from orchestrator.grid import eval_cell


def test_out_of_memory_is_transient():
    assert transient(torch.OutOfMemoryError("CUDA out of memory")) and transient(MemoryError())
    assert not transient(RuntimeError("shape mismatch")) and not transient(ValueError())


def test_an_evaluation_that_runs_out_of_memory_raises_the_retried_error(tmp_path, monkeypatch):
    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("orchestrator.evaluation.zeroshot.zeroshot", oom)
    with pytest.raises(TransientError, match="out of memory evaluating arc_easy"):
        eval_cell(str(tmp_path), "zeroshot", "arc_easy", 32, None, None, 4)


def _flaky_grid(tmp_path, tiny_dirs, max_retries: int):
    import yaml

    from orchestrator.grid import load_grid

    body = {"name": "flaky", "models": [str(tiny_dirs["llama"])], "methods": ["magnitude"], "top_ups": ["uniform"],
            "sparsities": [0.5], "nsamples": 4, "seqlen": 32, "eval_windows": 2,
            "tasks": {"perplexity": ["wikitext2"]}, "resources": {"max_retries": max_retries}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_grid(path)


@pytest.mark.ray
@pytest.mark.parametrize("failures,max_retries,status", [(1, 2, "done"), (9, 1, "failed")])
def test_ray_retries_an_out_of_memory_cell_and_the_store_records_one_that_stays_out(failures, max_retries, status,
                                                                                    tmp_path, tiny_dirs, shared_data,
                                                                                    monkeypatch):
    """A real Ray retry: the cell's task runs out of memory `failures` times (counted in a file, since
    every attempt is another worker); retried up to `max_retries`, it either completes or is recorded
    in the store as a transient failure that was retried."""
    import orchestrator.grid as grid
    from orchestrator.results.store import read_store

    attempts, real = tmp_path / "attempts", grid.prune_cell

    def flaky(spec_json, data_dir):  # pickled by value into each Ray worker
        from pathlib import Path

        from orchestrator.chain.ray_runtime import TransientError

        path = Path(attempts)
        n = int(path.read_text()) if path.exists() else 0
        path.write_text(str(n + 1))
        if n < failures:
            raise TransientError("out of memory pruning: CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(spec_json, data_dir)

    monkeypatch.setattr(grid, "prune_cell", flaky)
    store = tmp_path / "store"
    (state,) = grid.run_grid(_flaky_grid(tmp_path, tiny_dirs, max_retries), store, data_dir=str(shared_data),
                             num_cpus=2).values()
    assert state.status == status, state.error
    assert int(attempts.read_text()) == min(failures, max_retries) + 1
    rows = read_store(store).table.to_pylist()
    if status == "done":
        assert {r["metric"] for r in rows} == {"sparsity_actual", "perplexity"}
    else:
        (row,) = rows
        assert row["task"] == "failed:prune:" and "transient, retried" in row["note"] and "out of memory" in row["note"]
