"""Weights per node (issue 11) against real protocol servers on 127.0.0.1, real clients, no mocks.

The driver reads only config, tokenizer and safetensors index; a shard downloads only the
safetensors files holding its tensors. Checked for a hub id (`huggingface_hub` against
`tests/hubserver.py`) and for a storage URI (s3fs against moto's S3 server), on a tiny LLaMA whose
safetensors are split over several files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuroal.errors import ModelLoadError
from neuroal.models import resolve_model
from orchestrator.planning import ShardSpec
from orchestrator.chain.session import open_session
from orchestrator.chain.shard import Shard

from conftest import make_tiny_checkpoint

REPO = "org/tiny"
INDEX_FILE = "model.safetensors.index.json"
BUCKET = "neuroal-models"
# the tiny LLaMA has 3 blocks: the last shard holds block 2 + norm + head, the first embeddings + blocks 0-1
LAST = ShardSpec(index=1, n_shards=2, first_block=2, end_block=3, has_embeddings=False, has_head=True)
FIRST = ShardSpec(index=0, n_shards=2, first_block=0, end_block=2, has_embeddings=True, has_head=False)


# ---------------------------------------------------------------------------------------------- the checkpoint


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny LLaMA with its tokenizer, re-saved so blocks, embeddings and head sit in different files."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("split") / "tiny", tokenizer=smollm2_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    files = set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values())
    assert files == {f.name for f in folder.glob("*.safetensors")}
    assert len(files) >= 5, files  # embeddings, head and blocks spread over several files
    return folder


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX_FILE).read_text())["weight_map"]


def files_for(folder: Path, spec: ShardSpec) -> set[str]:
    """The safetensors files holding a LLaMA shard's tensors, read from the index (not from Shard)."""
    out = set()
    for name, file in weight_map(folder).items():
        if name.startswith("model.layers."):
            mine = int(name.split(".")[2]) in spec.blocks
        elif name in ("model.norm.weight", "lm_head.weight"):
            mine = spec.has_head
        else:
            mine = spec.has_embeddings
        if mine:
            out.add(file)
    return out


def metadata_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(".safetensors")}


def weight_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".safetensors")}


def held(shard: Shard) -> dict[str, torch.Tensor]:
    return {n: t for n, t in shard.model.state_dict().items() if t.device.type != "meta"}


def assert_same_weights(remote: Shard, local: Shard) -> None:
    got, want = held(remote), held(local)
    assert set(got) == set(want) and got
    for name in want:
        assert torch.equal(got[name], want[name]), name


def watch_shards(monkeypatch, downloaded) -> list:
    """Note what was downloaded as open_session starts each shard (a spy on our Shard, nothing replaced)."""
    import orchestrator.chain.executors

    before = []

    class Watched(Shard):
        def __init__(self, *args, **kwargs):
            before.append(downloaded())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(orchestrator.chain.executors, "Shard", Watched)
    return before


@pytest.fixture(scope="module")
def local_shards(tiny_split):
    return {spec: Shard(tiny_split, spec, dtype="float32", device="cpu") for spec in (FIRST, LAST)}


# ---------------------------------------------------------------------------------------------- the hub


@pytest.fixture(scope="module")
def hub_server(tiny_split):
    from hubserver import HubServer

    with HubServer({REPO: tiny_split}) as server:
        yield server


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """The hub client pointed at the test server, with a fresh cache and no token.

    `huggingface_hub.constants` reads the environment once at import, so its values are set too
    (the library's own configuration; its behaviour is untouched). The environment is set as well
    for anything that reads it later (a subprocess, a Ray worker).
    """
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "neuroal"))
    hub_server.clear()
    return hub_server


def hub_snapshot(hub) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "models--org--tiny" / "snapshots" / hub.commit(REPO)


def hub_blobs() -> list[Path]:
    from huggingface_hub import constants

    blobs = Path(constants.HF_HUB_CACHE) / "models--org--tiny" / "blobs"
    return sorted(blobs.iterdir()) if blobs.exists() else []


def test_hub_driver_downloads_metadata_only(hub, tiny_split):
    folder = resolve_model(REPO, weights=False)

    assert folder == hub_snapshot(hub)
    assert {"config.json", "tokenizer.json", INDEX_FILE} <= metadata_files(tiny_split)
    assert sorted(hub.downloaded(REPO)) == sorted(metadata_files(tiny_split))  # each once, no weights
    assert not [p for _, p in hub.requests if p.endswith(".safetensors")]  # not even a HEAD
    assert {p.name for p in folder.iterdir()} == metadata_files(tiny_split)
    assert len(hub_blobs()) == len(metadata_files(tiny_split))


@pytest.mark.parametrize("spec", [LAST, FIRST], ids=["last-block-and-head", "embeddings-and-first-blocks"])
def test_hub_shard_downloads_only_its_files(hub, tiny_split, local_shards, spec):
    expected = files_for(tiny_split, spec)
    assert expected and expected < weight_files(tiny_split)  # the shard needs some files, not all

    shard = Shard(REPO, spec, dtype="float32", device="cpu")

    got = [f for f in hub.downloaded(REPO) if f.endswith(".safetensors")]
    assert sorted(got) == sorted(expected)  # exactly its files, each once
    assert {weight_map(tiny_split)[k] for k in shard.loaded} == expected
    assert weight_files(shard.model_dir) == expected
    assert shard.model_dir == hub_snapshot(hub)
    assert_same_weights(shard, local_shards[spec])


def test_hub_weights_true_downloads_everything(hub, tiny_split):
    folder = resolve_model(REPO, weights=True)

    assert sorted(hub.downloaded(REPO)) == sorted(metadata_files(tiny_split) | weight_files(tiny_split))
    assert {p.name for p in folder.iterdir()} == metadata_files(tiny_split) | weight_files(tiny_split)


def test_hub_local_session_downloads_each_file_once(hub, tiny_split, local_shards, monkeypatch):
    """open_session (the driver) reads metadata; its two in-process shards fetch their own files."""
    def weights_so_far():
        return sorted(f for f in hub.downloaded(REPO) if f.endswith(".safetensors"))

    before = watch_shards(monkeypatch, weights_so_far)
    session = open_session(REPO, executor="local", dtype="float32", device="cpu", shard_specs=[FIRST, LAST])
    try:
        assert before == [[], sorted(files_for(tiny_split, FIRST))]  # the driver took none; shard 0 its own
        weights = weights_so_far()
        assert weights == sorted(files_for(tiny_split, FIRST) | files_for(tiny_split, LAST))  # each once
        assert session.tokenizer("hello world")["input_ids"]
        for shard, spec in zip(session.chain.shards, (FIRST, LAST)):
            assert_same_weights(shard, local_shards[spec])
    finally:
        session.close()


def test_hub_unknown_repo_is_one_line(hub):
    with pytest.raises(ModelLoadError) as err:
        resolve_model("org/missing", weights=False)
    assert "\n" not in str(err.value) and "org/missing" in str(err.value)


# ---------------------------------------------------------------------------------------------- object storage


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory, tiny_split):
    """moto's S3 server on 127.0.0.1 holding the checkpoint at s3://BUCKET/tiny/, recording requests.

    Requests are logged by moto's recorder; its file is chosen when moto is imported, so the
    environment is set first.
    """
    mp = pytest.MonkeyPatch()
    recording = tmp_path_factory.mktemp("moto") / "recording.jsonl"
    mp.setenv("MOTO_RECORDER_FILEPATH", str(recording))
    import boto3
    import moto.moto_api
    import requests
    import s3fs
    from moto.server import ThreadedMotoServer

    if getattr(moto.moto_api.recorder, "_location", str(recording)) != str(recording):
        mp.undo()
        pytest.skip("moto was imported before this module set MOTO_RECORDER_FILEPATH")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "test"),
                       ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")):
        mp.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(key, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made elsewhere would keep its endpoint
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    for f in sorted(tiny_split.iterdir()):
        client.upload_file(str(f), BUCKET, f"tiny/{f.name}")
    client.put_object(Bucket=BUCKET, Key="no-config/README.md", Body=b"not a checkpoint")
    client.put_object(Bucket=BUCKET, Key="no-config/model.safetensors", Body=b"")

    class S3:
        url = endpoint

        def clear(self):
            requests.post(f"{endpoint}/moto-api/recorder/stop-recording")
            requests.post(f"{endpoint}/moto-api/recorder/reset-recording")
            requests.post(f"{endpoint}/moto-api/recorder/start-recording")

        def downloaded(self, prefix: str) -> list[str]:
            """Object names under `prefix` whose content was read (GetObject), repeats kept."""
            from urllib.parse import unquote, urlsplit

            text = requests.get(f"{endpoint}/moto-api/recorder/download-recording").text
            out = []
            for line in filter(None, text.splitlines()):
                entry = json.loads(line)
                path = unquote(urlsplit(entry["url"]).path)
                if entry["method"] == "GET" and path.startswith(f"/{BUCKET}/{prefix}/"):
                    out.append(path.rsplit("/", 1)[-1])
            return out

    try:
        yield S3()
    finally:
        requests.post(f"{endpoint}/moto-api/recorder/stop-recording")
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        mp.undo()


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "neuroal"))  # a fresh storage mirror
    s3fs.S3FileSystem.clear_instance_cache()  # and no listing cached by an earlier test
    s3_server.clear()
    return s3_server


URI = f"s3://{BUCKET}/tiny"


def distinct(names: list[str]) -> list[str]:
    """s3fs may read one object in several ranged GETs: the files read, once each."""
    return sorted(set(names))


def test_storage_driver_downloads_metadata_only(s3, tiny_split):
    folder = resolve_model(URI, weights=False)

    assert distinct(s3.downloaded("tiny")) == sorted(metadata_files(tiny_split))
    assert {p.name for p in folder.iterdir()} == metadata_files(tiny_split)
    assert not list((folder.parent).rglob("*.safetensors"))


@pytest.mark.parametrize("spec", [LAST, FIRST], ids=["last-block-and-head", "embeddings-and-first-blocks"])
def test_storage_shard_downloads_only_its_files(s3, tiny_split, local_shards, spec):
    expected = files_for(tiny_split, spec)
    assert expected and expected < weight_files(tiny_split)

    shard = Shard(URI, spec, dtype="float32", device="cpu")

    got = distinct([f for f in s3.downloaded("tiny") if f.endswith(".safetensors")])
    assert got == sorted(expected)
    assert weight_files(shard.model_dir) == expected
    assert_same_weights(shard, local_shards[spec])


def test_storage_weights_true_downloads_everything(s3, tiny_split):
    folder = resolve_model(URI + "/", weights=True)

    assert distinct(s3.downloaded("tiny")) == sorted(metadata_files(tiny_split) | weight_files(tiny_split))
    assert {p.name for p in folder.iterdir()} == metadata_files(tiny_split) | weight_files(tiny_split)


def test_storage_local_session_downloads_each_file_once(s3, tiny_split, local_shards, monkeypatch):
    def weights_so_far():
        return distinct([f for f in s3.downloaded("tiny") if f.endswith(".safetensors")])

    before = watch_shards(monkeypatch, weights_so_far)
    session = open_session(URI, executor="local", dtype="float32", device="cpu", shard_specs=[FIRST, LAST])
    try:
        assert before == [[], sorted(files_for(tiny_split, FIRST))]  # the driver took none; shard 0 its own
        assert weights_so_far() == sorted(files_for(tiny_split, FIRST) | files_for(tiny_split, LAST))
        assert session.tokenizer("hello world")["input_ids"]
        for shard, spec in zip(session.chain.shards, (FIRST, LAST)):
            assert_same_weights(shard, local_shards[spec])
    finally:
        session.close()


def test_storage_prefix_without_config_is_one_line(s3):
    with pytest.raises(ModelLoadError) as err:
        resolve_model(f"s3://{BUCKET}/no-config", weights=False)
    message = str(err.value)
    assert "\n" not in message
    assert "no config.json" in message and "README.md" in message  # it says what it found there
    assert not s3.downloaded("no-config")  # and downloaded nothing
