"""On CUDA (skipped without it): `--device auto` computes on the GPU in bfloat16, in process and in a
Ray actor given a GPU, with the same masks and λ on both paths; statistics stay fp32."""

import pytest
import torch

from orchestrator.spec import build_spec

from conftest import execute_and_read

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, requires_gpu]


def _run(tiny_dirs, shared_data, out, executor, **kw):
    spec = build_spec(model=str(tiny_dirs["llama_gqa"]), method="wanda", top_up="neuroal", sparsity=0.6, seqlen=32,
                      nsamples=8, executor=executor, data_dir=str(shared_data), eval="wikitext2", eval_windows=4,
                      out=str(out), **kw)
    done = execute_and_read(spec, out)
    return done.run, done.reports[0], done.weights


def test_in_process_and_ray_on_the_gpu(tiny_dirs, shared_data, tmp_path):
    import ray

    local, rep_l, w_l = _run(tiny_dirs, shared_data, tmp_path / "local", "local")
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        on_ray, rep_r, w_r = _run(tiny_dirs, shared_data, tmp_path / "ray", "ray")
    finally:
        ray.shutdown()
    for rep in (rep_l, rep_r):
        assert rep["device"].startswith("cuda") and rep["dtype"] == "bfloat16" and rep["peak_device_bytes"] > 0
    assert (local["lambda_block"], local["lambda_row"]) == (on_ray["lambda_block"], on_ray["lambda_row"])
    assert all(torch.equal(w_l[b][n], w_r[b][n]) for b in w_l for n in w_l[b])
    assert local["sparsity_actual"] == pytest.approx(0.6, abs=0.04)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_offloaded_blocks_move_host_to_gpu_and_give_the_resident_result(executor, tiny_dirs, shared_data, tmp_path):
    """Offloaded on a GPU: blocks parked in pinned host memory move to the device once per pass and
    back, and the λs and masks are those of the resident GPU run."""
    import ray

    if executor == "ray":
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        ref, _, w_ref = _run(tiny_dirs, shared_data, tmp_path / "resident", executor)
        off, rep, w_off = _run(tiny_dirs, shared_data, tmp_path / "offloaded", executor, offload="cpu")
    finally:
        if executor == "ray":
            ray.shutdown()
    assert rep["device"].startswith("cuda") and rep["peak_device_bytes"] > 0
    moves = rep["offload"]["moves"]
    assert rep["offload"]["mode"] == "cpu" and set(moves["prune"].values()) == {1}
    assert set(moves["score"].values()) == {4} and set(moves["forward"].values()) == {1}
    assert (off["lambda_block"], off["lambda_row"]) == (ref["lambda_block"], ref["lambda_row"])
    assert all(torch.equal(w_off[b][n], w_ref[b][n]) for b in w_ref for n in w_ref[b])
