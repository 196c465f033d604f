"""A model larger than the device budget: offloaded blocks take turns, block-major passes move each
block once per pass, and the result is the non-offloaded one (SmolLM2, --gpu-mem 150MB, one shard)."""

import pytest
import torch

from orchestrator.spec import build_spec

from conftest import execute_and_read

pytestmark = pytest.mark.slow

BUDGET = "150MB"  # SmolLM2 is 538 MB in fp32; its embeddings (113 MB) plus one block (14 MB) fit


def _run(shared_data, out, **kw):
    spec = build_spec(**{**dict(model="smollm2-135m", sparsity=0.7, seqlen=32, nsamples=8, executor="local",
                                data_dir=str(shared_data), eval="wikitext2", eval_windows=8), **kw, "out": str(out)})
    return execute_and_read(spec, out)


@pytest.mark.parametrize("method,top_up", [("wanda", "neuroal"), ("sparsegpt", "uniform")])
def test_offloaded_equals_resident(method, top_up, shared_data, tmp_path, request):
    if top_up == "neuroal":  # the resident run is the session's reference (conftest)
        reference = request.getfixturevalue("smollm2_wanda_neuroal")
        ref, ref_w = reference.run, reference.weights
        fields = {k: v for k, v in reference.spec.items() if k != "out"}
    else:
        fields = dict(method=method, top_up=top_up)
        ref_done = _run(shared_data, tmp_path / "ref", **fields)
        ref, ref_w = ref_done.run, ref_done.weights
    done = _run(shared_data, tmp_path / "off", **fields, gpu_mem=BUDGET)
    run, w, (report,) = done.run, done.weights, done.reports
    assert done.offload.mode == "cpu" and "do not fit --gpu-mem 150MB" in done.offload.why
    assert (run["lambda_block"], run["lambda_row"]) == (ref["lambda_block"], ref["lambda_row"])
    assert run["lambda_curves"] and all(p["complete"] for pts in run["lambda_curves"].values() for p in pts) \
        if top_up == "neuroal" else True  # block-major: the exact early stop is given up
    for step, pts in ref["lambda_curves"].items():
        off = {p["lambda"]: p["score"] for p in run["lambda_curves"][step]}
        assert all(off[p["lambda"]] == p["score"] for p in pts if p["complete"])
    assert all(torch.equal(w[b][n], ref_w[b][n]) for b in ref_w for n in ref_w[b])
    assert run["perplexity"]["wikitext2"] == pytest.approx(ref["perplexity"]["wikitext2"], rel=1e-6)
    off = report["offload"]
    assert off["peak_resident_bytes"] <= 150 * 10**6 == off["budget_bytes"]
    blocks = set(range(30))
    searches = 4 if top_up == "neuroal" else 0  # block step, its tie check, row step, its tie check
    if searches:
        assert off["moves"]["score"] == {b: searches for b in blocks}
    assert off["moves"]["prune"] == {b: 1 for b in blocks}  # the final pass
    assert off["moves"]["forward"] == {b: 1 for b in blocks}  # one evaluation pass
