"""The cluster configs parse, validate against Ray's launcher schema, ask for GPUs, and keep security on."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2] / "cluster_configs"
LAUNCHER = ["aws-p4d.yaml", "gcp-a2.yaml", "local.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]


def load(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d is not None]
    assert docs, name
    return docs


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def test_every_file_is_known_and_parses():
    names = sorted(p.name for p in ROOT.glob("*.yaml"))
    assert names == sorted(LAUNCHER + KUBERAY)
    for name in names:
        for doc in load(name):
            assert isinstance(doc, dict)


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY)
def test_top_level_fields_are_commented(name):
    """kuberay sample style: every top-level field has a comment line above it."""
    lines = (ROOT / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", " ", "-")) and ":" in line and line != "---":
            previous = next(p for p in reversed(lines[:i]) if p.strip())
            if previous.startswith("#") or previous == "---":
                continue
            if line.split(":")[0] in ("apiVersion", "kind", "metadata", "spec"):
                continue  # the Kubernetes object header
            pytest.fail(f"{name}:{i + 1}: {line!r} has no comment above it")


# ----------------------------------------------------------------------------------------------
# Ray cluster launcher
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_validates(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = load(name)
    validate_config(prepare_config(config))  # fills provider defaults, then Ray's JSON schema


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_token_auth_and_local_dashboard(name):
    (config,) = load(name)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start" in head and "--head" in head
    assert "RAY_AUTH_MODE=token ray start" in workers
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in (ROOT / name).read_text()


@pytest.mark.parametrize(
    "name,key,instance",
    [("aws-p4d.yaml", "InstanceType", "p4d.24xlarge"), ("gcp-a2.yaml", "machineType", "a2-ultragpu-8g")],
)
def test_cloud_gpu_workers(name, key, instance):
    (config,) = load(name)
    types = config["available_node_types"]
    gpu = {n: t for n, t in types.items() if t["node_config"].get(key) == instance}
    assert gpu, f"no node type with {key}={instance}"
    for t in gpu.values():
        assert t["resources"]["GPU"] == 8
        assert t["max_workers"] >= t.get("min_workers", 0) >= 1
    assert config["head_node_type"] in types
    # the token reaches every node, the project is installed on every node
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("pip install" in c and "neuroal" in c for c in config["setup_commands"])
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray_version()}")


def test_gcp_guest_accelerators():
    (config,) = load("gcp-a2.yaml")
    node = config["available_node_types"]["ray_worker_a2"]["node_config"]
    assert node["guestAccelerators"] == [{"acceleratorType": "nvidia-a100-80gb", "acceleratorCount": 8}]
    assert {"onHostMaintenance": "TERMINATE"} in node["scheduling"]


def test_local_head_on_loopback():
    (config,) = load("local.yaml")
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert any("get-auth-token --generate" in c and "/dev/null" in c for c in config["setup_commands"])


# ----------------------------------------------------------------------------------------------
# KubeRay
# ----------------------------------------------------------------------------------------------


def kuberay_cluster_spec(name: str) -> tuple[dict, dict]:
    docs = load(name)
    obj = next(d for d in docs if d["kind"] in ("RayCluster", "RayJob"))
    assert obj["apiVersion"] == "ray.io/v1"
    return obj, obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_gpu_workers_and_token_auth(name):
    _, spec = kuberay_cluster_spec(name)
    assert spec["rayVersion"] == ray_version()
    assert spec["authOptions"] == {"mode": "token"}
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        (worker,) = containers(group)
        limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == 8 == int(requests["nvidia.com/gpu"])
        assert int(group["rayStartParams"]["num-gpus"]) == 8
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert worker["image"].startswith(f"rayproject/ray:{ray_version()}")
    (head,) = containers(spec["headGroupSpec"])
    assert head["image"].startswith(f"rayproject/ray:{ray_version()}")
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_raycluster_dashboard_on_localhost():
    _, spec = kuberay_cluster_spec("kuberay-raycluster.yaml")
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayjob_dashboard_reachable_only_with_token():
    """The operator polls job status through the head Service, so the RayJob's dashboard listens on the
    pod network; that is allowed only with token auth on and a ClusterIP (default) head Service."""
    _, spec = kuberay_cluster_spec("kuberay-rayjob.yaml")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] in ("127.0.0.1", "0.0.0.0")
    if head["rayStartParams"]["dashboard-host"] != "127.0.0.1":
        assert spec["authOptions"]["mode"] == "token"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def shipped_commands() -> list[tuple[str, list[str]]]:
    """Every `neuroal prune` command the configs ship: the RayJob entrypoint and the commented usage."""
    out = []
    for path in sorted(ROOT.glob("*.yaml")):
        text = path.read_text()
        comment = "\n".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))
        joined = comment.replace("\\\n", " ")
        for line in joined.splitlines() + [line.strip() for line in text.splitlines() if "entrypoint:" in line]:
            if "neuroal prune" in line:
                argv = shlex.split(line.split("neuroal prune", 1)[1])
                out.append((path.name, argv))
    return out


def test_every_config_ships_a_prune_command():
    names = {name for name, _ in shipped_commands()}
    assert names == set(LAUNCHER + KUBERAY)


@pytest.mark.parametrize("name,argv", shipped_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_shipped_commands_pass_the_real_cli(name, argv, tmp_path, monkeypatch):
    """Each shipped command runs through `neuroal prune --check` (the real parser and spec validation);
    GPU clusters ask for shards, devices, dtypes and a storage --out, never a node-local folder."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prune", *argv, "--check"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.output)
    assert spec["device"] == "auto" and spec["shards"] >= 2
    if name != "local.yaml":
        assert spec["dtype"] == "bfloat16" and spec["shards"] == 8
        assert spec["out"].split("://")[0] in ("s3", "gs")


def test_rayjob_runtime_env():
    job, _ = kuberay_cluster_spec("kuberay-rayjob.yaml")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")
    assert any(p.startswith("neuroal") for p in env["pip"])


def test_kuberay_pods_get_storage_credentials_and_no_shared_volume():
    for name in KUBERAY:
        _, spec = kuberay_cluster_spec(name)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            volumes = group["template"]["spec"].get("volumes", [])
            assert not [v for v in volumes if "persistentVolumeClaim" in v], name
            (container,) = containers(group)
            assert {"secretRef": {"name": "neuroal-s3", "optional": True}} in container["envFrom"], name
