"""Zero-shot as a Ray task gets the devices the shard actors held: on one node whose every GPU is a
shard's it used to wait forever for them, and on CPU it ran with one thread.

The local Ray instance declares one GPU (Ray's fiction: the shard and the task compute on CPU), so
placement is real: one shard takes the node's only GPU and both its CPUs."""

import threading

import pytest
import ray

from orchestrator.evaluation.zeroshot import torch_threads_of_task, zeroshot_resources
from orchestrator.chain.placement import Placement
from orchestrator.pruning.job import prune
from orchestrator.spec import build_spec

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def one_gpu_node():
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _prune(tiny_dirs, shared_data, out, **kw):
    spec = build_spec(model=str(tiny_dirs["llama"]), method="wanda", top_up="uniform", sparsity=0.5, seqlen=32,
                      nsamples=4, data_dir=str(shared_data), eval="wikitext2", eval_windows=2, zeroshot="arc_easy",
                      zeroshot_limit=4, out=str(out), **kw)
    return prune(spec, store=False)


def test_zeroshot_gets_the_gpu_its_shard_held(one_gpu_node, tiny_dirs, shared_data, tmp_path):
    done = {}
    worker = threading.Thread(target=lambda: done.update(run=_prune(tiny_dirs, shared_data, tmp_path / "ray",
                                                                    executor="ray", shards=1)), daemon=True)
    worker.start()
    worker.join(timeout=300)  # before the fix the task waited for the shard's GPU forever
    assert "run" in done, "the zero-shot task never got the GPU the shard held"
    run = done["run"]
    local = _prune(tiny_dirs, shared_data, tmp_path / "local", executor="local")
    assert run["zeroshot"] == local["zeroshot"] and len(run["zeroshot"]) == 2
    assert run["perplexity"] == pytest.approx(local["perplexity"], rel=1e-6)
    # the shard's report, taken before its actor was released for the task
    assert [r["blocks"] for r in run["shard_reports"]] == [[0, 2]] and run["shard_reports"][0]["busy_seconds"] > 0
    assert ray.available_resources().get("GPU") == 1  # the run gave everything back


def test_zeroshot_alone_opens_no_shards(one_gpu_node, tiny_dirs, shared_data, monkeypatch):
    """`neuroal eval --zeroshot` without perplexity: the task loads the model; no actor loads it first."""
    import orchestrator.evaluation.jobs as eval_run

    def refuse(*_a, **_k):
        raise AssertionError("shard actors opened for a zero-shot-only evaluation")

    monkeypatch.setattr(eval_run, "open_evaluation_session", refuse)
    kw = dict(zeroshot_tasks=["arc_easy"], limit=4, data_dir=str(shared_data))
    on_ray = eval_run.evaluate_model(str(tiny_dirs["llama"]), executor="ray", **kw)
    here = eval_run.evaluate_model(str(tiny_dirs["llama"]), executor="local", **kw)
    assert on_ray["zeroshot"] == here["zeroshot"] and len(on_ray["zeroshot"]) == 2
    assert set(on_ray["timings_s"]) == {"zeroshot", "total"}


def test_a_task_runs_torch_on_the_cpus_ray_assigned_it(one_gpu_node):
    threads = ray.remote(torch_threads_of_task)
    assert ray.get(threads.options(num_cpus=2).remote()) == 2
    assert ray.get(threads.options(num_cpus=1).remote()) == 1
    assert ray.get(threads.options(num_cpus=0).remote()) is None  # less than a CPU: Ray's default stays


def test_zeroshot_resources_by_hand():
    gpu = Placement({"GPU": 1, "CPU": 12}, (8,), "cuda", None)
    assert zeroshot_resources(gpu, 8, {"GPU": 8, "CPU": 96}) == {"num_gpus": 8, "num_cpus": 96}
    assert zeroshot_resources(gpu, 8, {"CPU": 16}) == {"num_gpus": 0, "num_cpus": 16}  # a CPU head
    cpu = Placement({"CPU": 2}, (1, 1, 1), "cpu", 2)
    assert zeroshot_resources(cpu, 3, {"CPU": 2}) == {"num_gpus": 0, "num_cpus": 2}  # one node's CPUs at most
    assert zeroshot_resources(cpu, 3, {"CPU": 0}) == {"num_gpus": 0, "num_cpus": 0}  # a head with no CPUs


def test_the_users_tasks_run_in_the_ray_task_from_the_copy_sent_with_it(one_gpu_node, tiny_dirs, user_tasks):
    """--zeroshot-include on Ray: a worker that cannot read the driver's folder (another node; here a path
    that does not exist) runs the YAMLs and hooks sent with the task, and gets what the driver gets."""
    import dataclasses

    from orchestrator.evaluation import zeroshot as evaluation

    folder = evaluation.task_folder(str(user_tasks))
    elsewhere = dataclasses.replace(folder, path="/nonexistent/tasks")
    kw = dict(shards=1, device="cpu", address=None, num_fewshot=1)
    tasks = ["colours_mc", "sums_gen"]
    on_ray = evaluation.zeroshot_without_shards(str(tiny_dirs["llama"]), tasks, None, 4, executor="ray",
                                              include=elsewhere, **kw)
    here = evaluation.zeroshot_without_shards(str(tiny_dirs["llama"]), tasks, None, 4, executor="local", include=folder,
                                            **kw)
    assert on_ray == here
    assert {r["metric"] for r in on_ray} >= {"acc", "acc_norm", "exact_match,strict-match", "answer_chars,whole"}
