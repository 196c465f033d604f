"""A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head with no CPUs for
actors and two worker nodes that declare 2 GPUs each to Ray, so placement is real while compute
falls back to CPU. The distributed run equals the in-process one, and the driver only ever receives
host data."""

import time

import pytest
import torch

from orchestrator.chain.actors import RayChain
from orchestrator.pruning.job import execute, session_for
from orchestrator.chain.shard import Shard
from orchestrator.spec import build_spec
from orchestrator.chain.wire import find_tensors

from conftest import local_cluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """Two worker nodes of 2 CPUs and 2 declared GPUs (`conftest.local_cluster`)."""
    with local_cluster(2, cpus=2, gpus=2) as (c, _):
        yield c


class _Watched(RayChain):
    """Records the type paths of torch tensors in everything the driver fetches."""

    seen: list = []

    def get(self, handle):
        value = super().get(handle)
        type(self).seen.append(find_tensors(value))
        return value


def _spec(model, shared_data, out, **kw):
    base = dict(model=str(model), method="wanda", top_up="neuroal", sparsity=0.6, seqlen=32, nsamples=8,
                data_dir=str(shared_data), eval="wikitext2", eval_windows=4, out=str(out))
    return build_spec(**{**base, **kw})


def _weights(session):
    out = {}
    for i in range(session.chain.n_shards):
        out.update(session.chain.get(session.chain.call(i, Shard.block_weights)))
    return out


def test_three_gpu_shards_on_two_nodes_equal_the_in_process_run(cluster, tiny_dirs, shared_data, tmp_path,
                                                                monkeypatch):
    ref_spec = _spec(tiny_dirs["llama_gqa"], shared_data, tmp_path / "ref", executor="local")
    ref_session = session_for(ref_spec)
    try:
        ref = execute(ref_spec, tmp_path / "ref", session=ref_session)
        ref_weights = _weights(ref_session)
    finally:
        ref_session.close()

    monkeypatch.setattr("orchestrator.chain.actors.RayChain", _Watched)
    _Watched.seen = []
    spec = _spec(tiny_dirs["llama_gqa"], shared_data, tmp_path / "ray", executor="ray", shards=3,
                 address=cluster.address)
    session = session_for(spec)
    blocks_seen = []
    try:
        session.chain.set_progress(lambda kind, b: blocks_seen.append((kind, b)))
        run = execute(spec, tmp_path / "ray", session=session)  # search, final prune, save, perplexity
        time.sleep(1.5)  # the progress thread drains the actors' reports every 0.5 s
        leaked = [paths for paths in _Watched.seen if paths]
        chain = session.chain
        placement, nodes = chain.placement, chain.node_ids()
        reports = [chain.get(chain.call(i, Shard.report)) for i in range(3)]
        weights = _weights(session)
    finally:
        session.close()
    assert not leaked, f"the driver received torch tensors: {leaked[:3]}"
    # progress moves per block under Ray: every block of the final pass was reported
    assert {b for kind, b in blocks_seen if kind == "prune"} == {0, 1, 2}
    assert {b for kind, b in blocks_seen if kind == "score"} == {0, 1, 2}
    assert len(_Watched.seen) > 50  # every record of the search, the prune and the evaluation was checked
    # one shard actor per logical GPU, consecutive shards on one node
    assert placement.bundle["GPU"] == 1 and placement.groups == (2, 1)
    assert nodes[0] == nodes[1] != nodes[2]
    assert all(r["device"] == "cpu" and r["dtype"] == "float32" for r in reports)  # no CUDA: CPU, fp32
    assert (run["lambda_block"], run["lambda_row"]) == (ref["lambda_block"], ref["lambda_row"])
    assert all(torch.equal(weights[b][n], ref_weights[b][n]) for b in ref_weights for n in ref_weights[b])
    assert run["perplexity"]["wikitext2"] == pytest.approx(ref["perplexity"]["wikitext2"], rel=1e-6)


def test_more_shards_than_gpus_is_a_one_line_error(cluster, monkeypatch):
    """Never a silent CPU run: after a bounded wait for an autoscaler, one line naming what the cluster has."""
    from neuroal.errors import NeuroalError
    from orchestrator.chain.session import open_session

    monkeypatch.setenv("NEUROAL_GPU_WAIT_S", "2")
    with pytest.raises(NeuroalError) as err:
        open_session("smollm2-135m", executor="ray", shards=5, device="auto", address=cluster.address, seqlen=32)
    assert "5 shards need 5 GPUs" in str(err.value) and "the cluster has 4" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_cpu_shard_asks_for_at_most_one_node(cluster):
    """The head has no CPUs and each worker 2: one CPU shard takes one node's 2 CPUs, not the cluster's 4."""
    from orchestrator.chain.placement import place_shards

    one = place_shards(1, "cpu")
    assert one.bundle == {"CPU": 2} and one.groups == (1,) and one.threads == 2
    three = place_shards(3, "cpu")
    assert three.bundle == {"CPU": 1} and three.groups == (2, 1)


def test_zeroshot_runs_in_a_ray_task_not_in_the_driver(cluster, tiny_dirs, shared_data, tmp_path, monkeypatch):
    """The driver never loads the whole model: loading it here fails, in the Ray task it works."""
    import transformers

    def refuse(*_a, **_k):
        raise AssertionError("the driver loaded the whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    spec = _spec(tiny_dirs["llama"], shared_data, tmp_path / "zs", executor="ray", shards=2, top_up="uniform",
                 eval="", zeroshot="arc_easy", zeroshot_limit=4, address=cluster.address)
    session = session_for(spec)
    try:
        run = execute(spec, tmp_path / "zs", session=session)
    finally:
        session.close()
    assert {(r["task"], r["metric"]) for r in run["zeroshot"]} == {("arc_easy", "acc"), ("arc_easy", "acc_norm")}
