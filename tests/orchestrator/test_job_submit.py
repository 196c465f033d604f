"""`ray job submit` against a local head on 127.0.0.1 (token authentication on) runs a tiny prune."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_a_prune(tmp_path, tiny_dirs, shared_data):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    gcs, dash = free_port(), free_port()
    # every port of our own, so another Ray instance on the machine cannot take the job agent's
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
         "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 240
        while time.time() < deadline:
            if subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(2)
        out = tmp_path / "run"
        submit = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                  "neuroal", "prune", "--model", str(tiny_dirs["llama"]), "--method", "wanda", "--top-up", "neuroal",
                  "--sparsity", "0.6", "--seqlen", "32", "--nsamples", "8", "--data-dir", str(shared_data),
                  "--out", str(out), "--store", str(tmp_path / "store")]
        while True:  # the dashboard answers before the node's job agent registers (slow on a busy machine)
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in job.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        run = json.loads((out / "run.json").read_text())
        assert run["sparsity_actual"] == pytest.approx(0.6, abs=0.03) and run["lambda_block"] is not None
        # without the token the dashboard refuses the client
        bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        bare["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
        denied = subprocess.run([ray_bin, "job", "list", "--address", address], env=bare, capture_output=True, text=True)
        assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        _kill_cluster(head.pid, gcs)


def _kill_cluster(session_pid: int, gcs_port: int) -> None:
    """Stop this test's head and only it (`ray stop` would kill every Ray cluster on the machine)."""
    try:
        os.killpg(session_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    marks = (f"127.0.0.1:{gcs_port}", f"gcs_server_port={gcs_port}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(m in cmdline for m in marks):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
