"""A Llama-3.1-70B-shaped job on a simulated cluster (issue 26): 80 blocks, a 8:1 grouped-query ratio
and the 128,256-token vocabulary, at a narrow width (hidden 64: 8 query heads and 1 KV head of 8
dims; MLP 128), so the whole model is 21M parameters and the orchestration, not the arithmetic, is
what runs: 8 shard actors on a multi-node Ray cluster on this machine (a head with no CPUs, two
worker nodes declaring 4 GPUs each; compute falls back to CPU), and 2 offloaded shards
(`offload="cpu"`, block-major passes), each give the in-process one-shard run's λs, curves and
pruned weights.

The reference runs with `early_stop=False`, so every λ candidate's curve point is a full total. The
8 Ray shards race candidates with the product's exact early stop: a candidate that finished has the
reference's total bit for bit; one that stopped has a partial sum above the winner's total and not
above its own reference total (the sums add the same non-negative terms in the same order). The
offloaded shards take the search block-major (no early stop): their curves equal the reference's.
"""

import pytest
import torch

from orchestrator.spec import build_spec

from conftest import execute_and_read, local_cluster, make_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Llama-3.1-70B: 80 blocks, 64 query heads : 8 KV heads, vocabulary 128256; narrow everywhere else
SHAPE_70B = dict(vocab_size=128256, num_hidden_layers=80, hidden_size=64, num_attention_heads=8,
                 num_key_value_heads=1, intermediate_size=128)
NODES, GPUS_PER_NODE, SHARDS = 2, 4, 8


@pytest.fixture(scope="module")
def model_70b_shape(tmp_path_factory, smollm2_tokenizer):
    """The tokenizer's 49,152 ids are a subset of the model's 128,256: calibration text maps into it."""
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("shape70b"), tokenizer=smollm2_tokenizer,
                                **SHAPE_70B)


@pytest.fixture(scope="module")
def cluster_8_gpus():
    """As `test_cluster.cluster`: the head with no CPUs; two worker nodes of 4 declared GPUs (and 4 CPUs,
    so a shard's bundle is 1 GPU + 1 CPU)."""
    with local_cluster(NODES, cpus=GPUS_PER_NODE, gpus=GPUS_PER_NODE) as (c, _):
        yield c


def _run(model, shared_data, out, **kw):
    """Wanda + NeuroAL (block and row steps) at 70%, 8 windows of 32 tokens; the run, its weights, its shards."""
    spec = build_spec(model=str(model), method="wanda", top_up="neuroal", neuroal_step="both", sparsity=0.7,
                      seqlen=32, nsamples=8, data_dir=str(shared_data), out=str(out), **kw)
    done = execute_and_read(spec, out / "run")
    return done.run, done.weights, done.nodes


def test_a_70b_shaped_job_on_8_ray_shards_and_offloaded_equals_one_process(model_70b_shape, cluster_8_gpus,
                                                                           shared_data, tmp_path):
    ref, ref_w, _ = _run(model_70b_shape, shared_data, tmp_path / "local", executor="local", shards=1,
                         early_stop=False)
    ray8, ray8_w, nodes = _run(model_70b_shape, shared_data, tmp_path / "ray8", executor="ray", shards=SHARDS,
                               address=cluster_8_gpus.address)
    off2, off2_w, _ = _run(model_70b_shape, shared_data, tmp_path / "off2", executor="ray", shards=2, offload="cpu",
                           address=cluster_8_gpus.address)

    # the reference is not trivial: a non-uniform allocation, rising with depth, at the target sparsity
    assert ref["n_blocks"] == 80 and len(ref_w) == 80
    assert ref["lambda_block"] > 0 and ref["block_sparsity_planned"][0] < 0.7 < ref["block_sparsity_planned"][-1]
    assert ref["sparsity_actual"] == pytest.approx(0.7, abs=0.01)
    assert all(p["complete"] for step in ref["lambda_curves"].values() for p in step)

    # 8 shards of 10 blocks, 4 per node, on both worker nodes
    assert ray8["shards"] == [[10 * i, 10 * i + 9] for i in range(SHARDS)]
    assert len(set(nodes[:4])) == len(set(nodes[4:])) == 1 and nodes[0] != nodes[4]
    assert off2["shards"] == [[0, 39], [40, 79]]

    for run, w in ((ray8, ray8_w), (off2, off2_w)):
        assert (run["lambda_block"], run["lambda_row"]) == (ref["lambda_block"], ref["lambda_row"])
        assert run["block_sparsity_planned"] == ref["block_sparsity_planned"]
        assert w.keys() == ref_w.keys()
        different = [(b, n) for b in ref_w for n in ref_w[b] if not torch.equal(w[b][n], ref_w[b][n])]
        assert not different, f"pruned weights differ from the in-process run's: {different[:5]}"

    # offloaded shards score every candidate block-major to its total: the same curves, bit for bit
    assert off2["lambda_curves"] == ref["lambda_curves"]
    # racing shards: finished candidates equal the reference's totals; stopped ones lost honestly
    assert ray8["lambda_curves"].keys() == ref["lambda_curves"].keys()
    for step, curve in ray8["lambda_curves"].items():
        ref_curve = ref["lambda_curves"][step]
        assert [p["lambda"] for p in curve] == [p["lambda"] for p in ref_curve]
        best = min(p["score"] for p in ref_curve)
        for p, r in zip(curve, ref_curve):
            if p["complete"]:
                assert p["score"] == r["score"], (step, p, r)
            else:
                assert best < p["score"] <= r["score"], (step, p, r)
