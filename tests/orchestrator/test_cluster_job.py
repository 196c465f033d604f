"""What a cluster user types: `ray job submit … neuroal prune … --out s3://…` on a multi-node cluster with
no shared filesystem, against a real S3-protocol server (moto) on 127.0.0.1, with a worker node
removed mid-search (and a replacement added, as an autoscaler would). The checkpoint downloaded with
a real S3 client loads with `from_pretrained` and equals a local `--out` run bit for bit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from conftest import free_port, local_cluster, separate_node_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "neuroal-runs"
FLAGS = ["--model", "smollm2-135m", "--method", "wanda", "--top-up", "neuroal", "--neuroal-step", "block",
         "--sparsity", "0.6", "--seqlen", "32", "--nsamples", "8", "--eval", "wikitext2", "--eval-windows", "4"]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    srv.stop()


@pytest.fixture
def job_cluster():
    """A head with no CPUs for actors and a dashboard on 127.0.0.1, two workers declaring 2 GPUs each."""
    dash = free_port()
    with local_cluster(2, cpus=2, gpus=2, connect=False, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=dash) as (c, workers):
        yield c, workers, f"http://127.0.0.1:{dash}"


def _ray(*args, env, timeout=60):
    return subprocess.run([str(Path(sys.executable).with_name("ray")), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _download(prefix: str, folder: Path) -> Path:
    import boto3

    s3 = boto3.client("s3")
    folder.mkdir(parents=True, exist_ok=True)
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]:
        s3.download_file(BUCKET, obj["Key"], str(folder / obj["Key"].removeprefix(prefix + "/")))
    return folder


def test_job_submit_to_s3_survives_a_lost_node(job_cluster, s3, shared_data, tmp_path):
    cluster, workers, dashboard = job_cluster
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    deadline = time.time() + 240
    while _ray("job", "list", "--address", dashboard, env=env).returncode != 0 and time.time() < deadline:
        time.sleep(2)
    runtime_env = {"env_vars": {**s3, "HF_HUB_OFFLINE": "1", "NEUROAL_DATA_DIR": str(shared_data)}}
    submit = ["job", "submit", "--no-wait", "--address", dashboard, "--working-dir", str(ROOT),
              "--runtime-env-json", json.dumps(runtime_env), "--",
              "neuroal", "prune", *FLAGS, "--shards", "3", "--out", f"s3://{BUCKET}/smol", "--store",
              str(tmp_path / "store")]
    agents_deadline = time.time() + 480  # a loaded machine starts the agents slowly
    while True:  # the dashboard answers before the nodes' job agents register
        job = _ray(*submit, env=env, timeout=300)
        if "No available agent" not in job.stderr or time.time() > agents_deadline:
            break
        time.sleep(3)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", job.stdout + job.stderr).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)

    # wait until the search is under way (a first candidate scored, printed as it finishes), then lose a
    # worker node and add another
    removed = False
    while time.time() < deadline + 600:
        logs, status = client.get_job_logs(job_id), client.get_job_status(job_id)
        if not removed and "block λ=" in logs:
            cluster.remove_node(workers[1])
            cluster.add_node(num_cpus=2, num_gpus=2, node_ip_address="127.0.0.1", **separate_node_args())
            removed = True
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    assert removed, f"no candidate was scored before the job was {status}:\n{logs[-4000:]}"
    assert status == JobStatus.SUCCEEDED, logs[-4000:]

    got = _download("smol", tmp_path / "from-s3")
    run = json.loads((got / "run.json").read_text())
    assert run["recoveries"] >= 1  # the lost node's shard actors were restarted and their calls replayed
    assert {r["device"] for r in run["shard_reports"]} == {"cpu"}  # Ray's GPUs are declared only
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(got)

    # the same prune, in process, into a local folder
    from orchestrator.pruning.job import prune
    from orchestrator.spec import build_spec

    local_out = tmp_path / "local"
    spec = build_spec(model="smollm2-135m", method="wanda", top_up="neuroal", neuroal_step="block", sparsity=0.6,
                      seqlen=32, nsamples=8, eval="wikitext2", eval_windows=4, executor="local",
                      data_dir=str(shared_data), out=str(local_out))
    local_run = prune(spec, store=tmp_path / "store-local")
    local = AutoModelForCausalLM.from_pretrained(local_out)
    assert run["lambda_block"] == local_run["lambda_block"]
    assert run["perplexity"]["wikitext2"] == pytest.approx(local_run["perplexity"]["wikitext2"], rel=1e-6)
    remote_sd, local_sd = remote.state_dict(), local.state_dict()
    assert remote_sd.keys() == local_sd.keys()
    assert all(torch.equal(remote_sd[k], local_sd[k]) for k in local_sd)
    assert ray.is_initialized() is False  # the test process never connected: the job's driver did it all
