"""On a local Ray instance: N shards equal one in-process shard; a killed actor is recovered."""

import pytest
import ray
import torch

from orchestrator.chain.actors import RayChain
from orchestrator.pruning.job import execute, session_for
from orchestrator.chain.shard import Shard
from orchestrator.spec import build_spec

from conftest import execute_and_read

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _spec(model, shared_data, out, **kw):
    base = dict(model=str(model), method="wanda", top_up="neuroal", sparsity=0.6, seqlen=32, nsamples=8,
                data_dir=str(shared_data), eval="wikitext2", eval_windows=4, out=str(out))
    base.update(kw)
    return build_spec(**base)


def _run(spec, out, resume_dir=None):
    done = execute_and_read(spec, out, resume_dir)
    return done.run, done.weights, done.recoveries


def _same(a, b):
    return all(torch.equal(a[blk][name], b[blk][name]) for blk in a for name in a[blk]) and a.keys() == b.keys()


@pytest.fixture(scope="module")
def references(tiny_dirs, shared_data, tmp_path_factory):
    """The in-process one-shard run of each model, made once per module when first asked for."""
    done = {}

    def get(model: str):
        if model not in done:
            out = tmp_path_factory.mktemp(f"ref-{model}")
            done[model] = _run(_spec(tiny_dirs[model], shared_data, out, executor="local", shards=1), out)
        return done[model]

    return get


@pytest.fixture(scope="module")
def reference(references):
    return references("llama_gqa")


# GQA Llama, a dense family with per-block kwargs (Gemma 2's sliding/global layers) and a mixture of experts
@pytest.mark.parametrize("model", ["llama_gqa", "gemma2", "mixtral"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_ray_shards_equal_the_in_process_run(model, shards, ray_local, references, tiny_dirs, shared_data, tmp_path):
    run, weights, _ = _run(_spec(tiny_dirs[model], shared_data, tmp_path, executor="ray", shards=shards), tmp_path)
    ref_run, ref_weights, _ = references(model)
    assert (run["lambda_block"], run["lambda_row"]) == (ref_run["lambda_block"], ref_run["lambda_row"])
    for step, points in run["lambda_curves"].items():  # which losers stop early depends on timing
        ref = {p["lambda"]: p for p in ref_run["lambda_curves"][step]}
        for p in points:
            if p["complete"] and ref[p["lambda"]]["complete"]:
                assert p["score"] == ref[p["lambda"]]["score"]
    assert _same(weights, ref_weights)
    assert run["perplexity"]["wikitext2"] == pytest.approx(ref_run["perplexity"]["wikitext2"], rel=1e-6)


class _Killer(RayChain):
    """Kills one actor right after the n-th `run` call was submitted to it."""

    kill_shard, kill_at = 1, 5

    def call(self, shard, method, *args):
        out = super().call(shard, method, *args)
        if shard == self.kill_shard and method is Shard.run:
            self.kill_at -= 1
            if self.kill_at == 0:
                ray.kill(self.actors[shard], no_restart=False)
        return out


def test_killed_actor_mid_search_gives_the_same_result(ray_local, reference, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.chain.actors.RayChain", _Killer)
    run, weights, recoveries = _run(_spec(tiny_dirs["llama_gqa"], shared_data, tmp_path, executor="ray", shards=2),
                                    tmp_path)
    assert recoveries >= 1
    ref_run, ref_weights, _ = reference
    assert (run["lambda_block"], run["lambda_row"]) == (ref_run["lambda_block"], ref_run["lambda_row"])
    assert _same(weights, ref_weights)


class _KillAfterPrune(RayChain):
    """Kills shard 0 when the driver asks it to save, i.e. after its blocks were pruned."""

    def call(self, shard, method, *args):
        if shard == 0 and method is Shard.save and not getattr(self, "_killed", False):
            self._killed = True
            ray.kill(self.actors[0], no_restart=False)
        return super().call(shard, method, *args)


class _KillUpstreamInEval(RayChain):
    """Kills shard 0 right after the first evaluation stream entered it (after `save`): shard 1's
    calls already wait on the lost output, and the driver only asks for the last shard's result."""

    def call(self, shard, method, *args):
        self._saved = getattr(self, "_saved", False) or method is Shard.save
        out = super().call(shard, method, *args)
        if shard == 0 and method is Shard.run and self._saved and not getattr(self, "_killed", False):
            self._killed = True
            ray.kill(self.actors[0], no_restart=False)
        return out


def test_lost_upstream_output_is_recomputed(ray_local, reference, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.chain.actors.RayChain", _KillUpstreamInEval)
    run, weights, recoveries = _run(_spec(tiny_dirs["llama_gqa"], shared_data, tmp_path / "out", executor="ray",
                                          shards=2), tmp_path / "out", resume_dir=tmp_path / "partial")
    assert recoveries >= 1
    assert _same(weights, reference[1])
    assert run["perplexity"]["wikitext2"] == pytest.approx(reference[0]["perplexity"]["wikitext2"], rel=1e-6)


def test_restart_after_prune_restores_the_checkpoint(ray_local, reference, tiny_dirs, shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.chain.actors.RayChain", _KillAfterPrune)
    resume = tmp_path / "partial"
    run, weights, recoveries = _run(_spec(tiny_dirs["llama_gqa"], shared_data, tmp_path / "out", executor="ray",
                                          shards=2), tmp_path / "out", resume_dir=resume)
    assert recoveries >= 1 and list(resume.glob("shard-*.safetensors"))
    assert _same(weights, reference[1])
    assert run["sparsity_actual"] == pytest.approx(reference[0]["sparsity_actual"])


def test_offloaded_ray_shards_equal_the_in_process_run_and_run_json_counts_moves(ray_local, reference, tiny_dirs,
                                                                                 shared_data, tmp_path):
    """Offloading on the Ray path: 2 offloaded shard actors give the resident in-process λs and masks,
    and run.json records, per shard, each block moved once per search step, once for the final pass
    and once for the evaluation pass."""
    from safetensors.torch import load_file

    from orchestrator.pruning.job import prune

    out = tmp_path / "run"
    run = prune(_spec(tiny_dirs["llama_gqa"], shared_data, out, executor="ray", shards=2, offload="cpu"), store=False)
    ref_run, ref_weights, _ = reference
    assert (run["lambda_block"], run["lambda_row"]) == (ref_run["lambda_block"], ref_run["lambda_row"])
    assert run["perplexity"]["wikitext2"] == pytest.approx(ref_run["perplexity"]["wikitext2"], rel=1e-6)
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(f))
    assert all(torch.equal(saved[f"model.layers.{b}.{n}.weight"], w) for b in ref_weights for n, w in ref_weights[b].items())
    import json

    written = json.loads((out / "run.json").read_text())["offload"]
    assert written["mode"] == "cpu" and len(written["shards"]) == 2
    blocks = []
    for shard in written["shards"]:
        own = sorted(int(b) for b in shard["moves"]["prune"])
        blocks += own
        assert shard["moves"]["score"] == {str(b): 4 for b in own}  # block step, tie check, row step, tie check
        assert shard["moves"]["prune"] == {str(b): 1 for b in own}
        assert shard["moves"]["forward"] == {str(b): 1 for b in own}
    assert blocks == list(range(len(ref_weights)))


@pytest.mark.parametrize("method", ["ria", "d2prune"])
def test_ria_and_d2prune_on_two_offloaded_ray_shards_equal_the_in_process_run(method, ray_local, tiny_dirs, shared_data,
                                                                              tmp_path):
    """RIA (NeuroAL block and row steps) and D²Prune (block step only, its output-norm statistics
    gathered on each shard) on 2 offloaded Ray shard actors: the in-process λs and masks.

    RIA's weights are the in-process ones bit for bit. D²Prune's swept linears, like SparseGPT's, differ
    in the last bits: each actor runs torch on its CPU share (1 thread here, 2 in-process), and the
    OBS update's matmuls round by thread count; its masks, and its v_proj (no update), are exact."""
    ref_run, ref_weights, _ = _run(_spec(tiny_dirs["llama_gqa"], shared_data, tmp_path / "ref", executor="local",
                                         shards=1, method=method), tmp_path / "ref")
    run, weights, _ = _run(_spec(tiny_dirs["llama_gqa"], shared_data, tmp_path / "ray", executor="ray", shards=2,
                                 offload="cpu", method=method), tmp_path / "ray")
    assert run["lambda_block"] is not None and (run["lambda_row"] is None) == (method == "d2prune")
    assert (run["lambda_block"], run["lambda_row"]) == (ref_run["lambda_block"], ref_run["lambda_row"])
    assert weights.keys() == ref_weights.keys()
    for b, ref in ref_weights.items():
        for name, w in ref.items():
            assert torch.equal(weights[b][name] == 0, w == 0), (b, name)
            if method == "ria" or name == "self_attn.v_proj":
                assert torch.equal(weights[b][name], w), (b, name)
            else:
                assert torch.allclose(weights[b][name], w, rtol=0, atol=1e-5), (b, name)
    assert run["perplexity"]["wikitext2"] == pytest.approx(ref_run["perplexity"]["wikitext2"], rel=1e-5)


def test_a_cpu_shard_actor_keeps_freed_host_memory(ray_local, tiny_dirs, shared_data, tmp_path):
    """The CPU shard actor raised glibc's malloc thresholds (neuroal.host_memory) when it loaded."""
    session = session_for(_spec(tiny_dirs["llama_gqa"], shared_data, tmp_path, executor="ray", shards=1))
    try:
        kept = ray.get(session.chain.actors[0].__ray_call__.remote(
            lambda _self: __import__("neuroal.host_memory", fromlist=["_kept"])._kept))
    finally:
        session.close()
    assert kept is True


def test_evaluation_shards_balance_the_head_and_equal_one_shard(ray_local, smollm2_tokenizer, shared_data, tmp_path,
                                                                monkeypatch):
    """`neuroal eval --shards 2`: the last shard, which runs the 49k-word head, gets fewer blocks
    than a pruning session's split gives it, and the perplexity is the in-process one's."""
    from conftest import make_tiny_checkpoint

    import orchestrator.evaluation.jobs as eval_run
    from orchestrator.evaluation.jobs import evaluate_model
    from orchestrator.chain.session import open_session, planned_shards

    model = make_tiny_checkpoint("llama_gqa", tmp_path / "six", tokenizer=smollm2_tokenizer, num_hidden_layers=6)
    opened = []
    monkeypatch.setattr(eval_run, "open_session", lambda *a, **kw: opened.append(open_session(*a, **kw)) or opened[-1])
    kw = dict(perplexity_sets=["wikitext2"], seqlen=32, windows=6, data_dir=str(shared_data), dtype="auto", device="auto",
              address=None)
    ray_run = evaluate_model(str(model), executor="ray", shards=2, **kw)
    local_run = evaluate_model(str(model), executor="local", shards=1, **kw)
    prune_split, _, _ = planned_shards(opened[0].config, shards=2, gpu_mem=None, dtype="float32", method="wanda",
                                       stream_windows=8, seqlen=32)
    assert [len(s.blocks) for s in prune_split] == [3, 3]
    assert [len(s.blocks) for s in opened[0].shard_specs] == [5, 1]  # the head weighs ~235 tiny blocks
    assert ray_run["perplexity"]["wikitext2"] == pytest.approx(local_run["perplexity"]["wikitext2"], rel=1e-6)
