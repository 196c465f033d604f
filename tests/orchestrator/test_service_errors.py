"""Services that are not there give one line, exit 2, nothing written (issue 23): a Ray address where no
cluster answers, storage URIs this process (or a worker node) cannot reach; and a healthy run on Ray
prints no core-worker error about constructor arguments in the object store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

from conftest import free_port, local_cluster

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "neuroal-runs"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
               "AWS_ENDPOINT_URL_S3")
TINY_FLAGS = ["--seqlen", "16", "--nsamples", "2", "--top-up", "uniform"]

runner = CliRunner()


def _one_line_error(result) -> str:
    text = result.output.strip()
    assert result.exit_code == 2, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------- a Ray address where nothing answers


@pytest.fixture
def grid_yaml(tmp_path, tiny_dirs):
    path = tmp_path / "g.yaml"
    path.write_text(f"name: t\nmodels: [{tiny_dirs['llama']}]\nmethods: [wanda]\ntop_ups: [uniform]\n"
                    "sparsities: [0.5]\ncalibration: wikitext2\nnsamples: 2\nseqlen: 16\n"
                    "tasks:\n  perplexity: [wikitext2]\n")
    return path


def _command(kind: str, address_flag: list[str], tmp_path: Path, tiny_dirs, grid_yaml) -> list[str]:
    if kind == "prune":
        return ["prune", "--model", str(tiny_dirs["llama"]), *TINY_FLAGS, "--out", str(tmp_path / "out"),
                "--store", str(tmp_path / "store"), *address_flag]
    if kind == "eval":
        return ["eval", "--model", str(tiny_dirs["llama"]), "--eval", "wikitext2", "--store", str(tmp_path / "store"),
                *address_flag]
    return ["grid", str(grid_yaml), "--store", str(tmp_path / "store"), *address_flag]


@pytest.mark.parametrize("kind", ["prune", "eval", "grid"])
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_where_no_cluster_answers_is_one_line(kind, scheme, tmp_path, tiny_dirs, shared_data, grid_yaml,
                                                         monkeypatch):
    monkeypatch.setenv("NEUROAL_RAY_WAIT_S", "2")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"{scheme}127.0.0.1:{free_port()}"
    t = time.monotonic()
    line = _one_line_error(runner.invoke(app, _command(kind, ["--address", address], tmp_path, tiny_dirs, grid_yaml)))
    assert time.monotonic() - t < 60
    assert line.startswith("error: --address: no Ray cluster answers at " + address), line
    assert "connection refused" in line and "ray start --head" in line and "leave out --address" in line
    assert list(tmp_path.iterdir()) == [grid_yaml]  # no out folder, no store, no temporary sibling


def test_ray_address_from_the_environment_is_named(tmp_path, tiny_dirs, shared_data, grid_yaml, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("NEUROAL_RAY_WAIT_S", "2")
    monkeypatch.setenv("RAY_ADDRESS", address)
    line = _one_line_error(runner.invoke(app, _command("prune", [], tmp_path, tiny_dirs, grid_yaml)))
    assert f"{address} (from $RAY_ADDRESS)" in line and "unset RAY_ADDRESS" in line


def test_the_default_wait_is_bounded(monkeypatch):
    """Without the test's short wait, an address where nothing listens answers within a minute."""
    from orchestrator.chain.ray_runtime import RAY_WAIT_S, RayUnavailable, check_address

    monkeypatch.delenv("NEUROAL_RAY_WAIT_S", raising=False)
    assert 5 <= RAY_WAIT_S <= 30
    t = time.monotonic()
    with pytest.raises(RayUnavailable):
        check_address(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t < 60


@pytest.fixture
def listening_address():
    """Something that accepts TCP connections on 127.0.0.1 (so `check_address` passes): Ray's join decides."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield f"127.0.0.1:{srv.getsockname()[1]}"


def _failing_join(causes: list[BaseException]):
    """A stand-in for `ray.init` that fails the way Ray's join does (a ConnectionError raised from the cause),
    once per cause, then joins; it records each call."""
    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        if len(calls) <= len(causes):
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}") from causes[len(calls) - 1]

    return init, calls


def test_a_join_that_fails_with_a_cause_is_tried_again(listening_address, monkeypatch):
    """CI saw a job's driver fail its join on a busy 2-core head (the head answered, Ray's join timed out)."""
    import ray

    from orchestrator.chain import ray_runtime

    init, calls = _failing_join([RuntimeError("No node info found matching attributes: '' when trying to resolve")])
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_runtime, "JOIN_PAUSE_S", 0.0)
    assert ray_runtime.ensure_ray(listening_address) is False  # joined, not started
    assert calls == [listening_address] * 2


def test_a_join_that_keeps_failing_says_why_in_one_line(listening_address, monkeypatch):
    import ray

    from orchestrator.chain import ray_runtime

    gcs = RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                       "  File \"node.py\", line 1, in _init_gcs_client\nray.exceptions.RpcError: Deadline Exceeded")
    init, calls = _failing_join([gcs] * ray_runtime.JOIN_ATTEMPTS)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_runtime, "JOIN_PAUSE_S", 0.0)
    with pytest.raises(ray_runtime.RayUnavailable) as got:
        ray_runtime.ensure_ray(listening_address)
    message = str(got.value)
    assert "\n" not in message and len(calls) == ray_runtime.JOIN_ATTEMPTS
    assert (f"cannot connect to Ray at {listening_address}: Failed to connect to GCS. Last connection error: "
            f"ray.exceptions.RpcError: Deadline Exceeded ({ray_runtime.JOIN_ATTEMPTS} tries)") in message


def test_a_ray_version_mismatch_is_one_line_and_not_tried_again(listening_address, monkeypatch):
    """A laptop's Ray or Python that is not the cluster's: Ray's six-line message, on one line, at once."""
    import ray

    from orchestrator.chain import ray_runtime

    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        raise RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n"
                           "This process on node 127.0.0.1 was started with:\n    Ray: 2.59.0\n    Python: 3.12.1\n")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ray_runtime.RayUnavailable) as got:
        ray_runtime.ensure_ray(listening_address)
    assert calls == [listening_address]
    assert ("Version mismatch: The cluster was started with: Ray: 2.60.0 Python: 3.11.7 This process on node "
            "127.0.0.1 was started with: Ray: 2.59.0 Python: 3.12.1; install the cluster's Ray and Python versions "
            "here") in str(got.value)


def test_auto_with_no_cluster_fails_at_once(listening_address, monkeypatch):
    """A ConnectionError without a cause is Ray saying there is nothing to join: no second try."""
    import ray

    from orchestrator.chain import ray_runtime

    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ray_runtime.RayUnavailable, match="Could not find any running Ray instance"):
        ray_runtime.ensure_ray("auto")
    assert calls == ["auto"]


def test_a_dashboard_address_is_one_line(tmp_path, tiny_dirs, grid_yaml, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    line = _one_line_error(runner.invoke(app, _command("prune", ["--address", "http://127.0.0.1:8265"], tmp_path,
                                                       tiny_dirs, grid_yaml)))
    assert "--address: http://127.0.0.1:8265 is a dashboard" in line and "ray job submit" in line


# ---------------------------------------------------------------- storage URIs this process cannot reach


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 with one bucket; credentials in the environment, no ~/.aws files."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # an instance made elsewhere would keep its endpoint and credentials
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    for key in CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
           "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3
    import requests

    # moto keeps its buckets per process, not per server: start from none (another test's server may
    # have left objects in a bucket of the same name)
    requests.post(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", timeout=10).raise_for_status()
    client = boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    requests.post(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", timeout=10)
    srv.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def _with_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def _prune_local(out, *extra):
    return runner.invoke(app, ["prune", "--executor", "local", "--out", str(out), *TINY_FLAGS, *extra])


def _bucket_keys(client) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def test_out_without_credentials_is_one_line(s3, tmp_path):
    _, client = s3
    t = time.monotonic()
    line = _one_line_error(_prune_local(f"s3://{BUCKET}/run", "--store", str(tmp_path / "store")))
    assert time.monotonic() - t < 30
    assert line.startswith(f"error: --out: cannot reach s3://{BUCKET}/run: no credentials found; "), line
    assert "AWS_ACCESS_KEY_ID" in line and "AWS_SECRET_ACCESS_KEY" in line and "AWS_PROFILE" in line
    assert "AWS_ENDPOINT_URL" in line
    assert _bucket_keys(client) == [] and not (tmp_path / "store").exists()


def test_out_in_a_bucket_that_does_not_exist_is_one_line(s3, tmp_path, monkeypatch):
    env, client = s3
    _with_credentials(monkeypatch)
    line = _one_line_error(_prune_local("s3://no-such-bucket/run", "--store", str(tmp_path / "store")))
    assert line.startswith("error: --out: cannot reach s3://no-such-bucket/run: the bucket 'no-such-bucket' does "
                           f"not exist at {env['AWS_ENDPOINT_URL']}; create it"), line
    assert not (tmp_path / "store").exists()


def test_store_without_credentials_is_one_line(s3, tmp_path):
    line = _one_line_error(_prune_local(tmp_path / "out", "--store", f"s3://{BUCKET}/store"))
    assert line.startswith(f"error: --store: cannot reach s3://{BUCKET}/store: no credentials found"), line
    assert not (tmp_path / "out").exists()


def test_an_endpoint_that_does_not_answer_is_one_line(s3, tmp_path, monkeypatch):
    _with_credentials(monkeypatch)
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    line = _one_line_error(_prune_local(f"s3://{BUCKET}/run", "--store", str(tmp_path / "store")))
    assert f"--out: cannot reach s3://{BUCKET}/run: the storage endpoint at {endpoint} does not answer" in line


def test_eval_of_a_run_in_a_bucket_without_credentials_is_one_line(s3, tmp_path):
    line = _one_line_error(runner.invoke(app, ["eval", "--model", f"s3://{BUCKET}/run", "--eval", "wikitext2",
                                               "--executor", "local", "--store", str(tmp_path / "store")]))
    assert line.startswith(f"error: --model: cannot reach s3://{BUCKET}/run: no credentials found"), line


def test_storage_access_error_pickles():
    import pickle

    from neuroal.errors import StorageAccessError

    exc = StorageAccessError("--out", "s3://b/r", "no credentials found", "set X", where="shard 1 on node n")
    back = pickle.loads(pickle.dumps(exc))
    assert str(back) == str(exc) == "--out: shard 1 on node n cannot reach s3://b/r: no credentials found; set X"


# ---------------------------------------------------------------- worker nodes without the driver's credentials


@pytest.fixture
def cluster_without_credentials(s3, monkeypatch):
    """A head with no CPUs and a worker node started while the environment had no AWS credentials (so its
    workers have none); the test process, the driver, gets them afterwards."""
    with local_cluster(1, cpus=2, connect=False) as (c, _):
        _with_credentials(monkeypatch)
        yield c


@pytest.mark.ray
def test_worker_nodes_without_credentials_are_one_line(cluster_without_credentials, s3, tiny_dirs, shared_data,
                                                       tmp_path):
    _, client = s3
    t = time.monotonic()
    result = runner.invoke(app, ["prune", "--model", str(tiny_dirs["llama"]), *TINY_FLAGS, "--executor", "ray",
                                 "--address", cluster_without_credentials.address, "--out", f"s3://{BUCKET}/run",
                                 "--store", str(tmp_path / "store")])
    line = _one_line_error(result)
    assert time.monotonic() - t < 120
    assert re.match(rf"error: --out: shard 0 on node 127\.0\.0\.1 \(\w+\) cannot reach s3://{BUCKET}/run/_partial-\w+: "
                    r"no credentials found; set AWS_ACCESS_KEY_ID", line), line
    assert "set the same variables on the worker nodes" in line and "--runtime-env-json" in line
    import ray

    # nothing was written, and the shard actors were released, not left holding the worker's CPUs
    assert _bucket_keys(client) == []
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 2


def _wait_gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs")


@pytest.mark.ray
def test_a_shard_restarted_where_the_bucket_is_gone_is_one_error_not_retries(s3, tiny_dirs, monkeypatch):
    """The recovery path: Ray restarts a killed shard, whose constructor can no longer reach `--out`; the
    chain raises that StorageAccessError once (no waiting for restarts that cannot help)."""
    from orchestrator.chain.ray_runtime import ray_instance

    _, client = s3
    _with_credentials(monkeypatch)  # before Ray starts: its workers inherit them
    with ray_instance(None, 2):
        _lost_actor_cannot_reach_storage(client, tiny_dirs)


def _lost_actor_cannot_reach_storage(client, tiny_dirs):
    import ray

    from neuroal.errors import StorageAccessError
    from orchestrator.planning import ShardSpec
    from orchestrator.chain.actors import RayChain
    from orchestrator.chain.shard import Shard

    chain = RayChain(tiny_dirs["llama"], [ShardSpec(0, 1, 0, 3, True, True)], device="cpu",
                     resume_dir=f"s3://{BUCKET}/run/_partial-k", recover_timeout_s=120)
    try:
        assert chain.get(chain.call(0, Shard.get_shapes))
        client.delete_bucket(Bucket=BUCKET)
        ray.kill(chain.actors[0], no_restart=False)
        _wait_gone(chain._pids[0])  # the next call must not reach the old actor
        t = time.monotonic()
        with pytest.raises(StorageAccessError) as err:
            chain.get(chain.call(0, Shard.get_shapes))
        assert time.monotonic() - t < 60
    finally:
        chain.close()
    text = str(err.value)
    assert re.match(rf"--out: shard 0 on node \S+ \(\w+\) cannot reach s3://{BUCKET}/run/_partial-k: the bucket "
                    rf"'{BUCKET}' does not exist", text), text
    assert "\n" not in text and chain.recoveries == 0


# ---------------------------------------------------------------- a healthy run prints no core-worker error


@pytest.mark.ray
def test_a_healthy_ray_run_prints_no_constructor_argument_error(tiny_dirs, shared_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NEUROAL_DATA_DIR=str(shared_data), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "orchestrator", "prune", "--model", str(tiny_dirs["llama"]),
                           *TINY_FLAGS, "--executor", "ray", "--shards", "2", "--out", str(tmp_path / "out"),
                           "--store", str(tmp_path / "store")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray's C++ log lines: "[2026-12-06 23:33:09,233 E 4637 4637] core_worker.cc:2465: Actor ... has constructor
    # arguments in the object store and max_restarts > 0 ..." (ray-project/ray#53727)
    bad = [line for line in done.stderr.splitlines()
           if re.match(r"^\[[^\]]* E \d+ \d+\]", line) or "core_worker.cc" in line
           or "constructor arguments in the object store" in line]
    assert not bad, "\n".join(bad)
    assert (tmp_path / "out" / "run.json").exists()
