"""orchestrator.evaluation and what a one-off `neuroal eval` relies on: an evaluation's identity holds
its compute dtype, token streams come from the disk cache, and `--executor auto` picks the executor."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neuroal.data import TokenCache, perplexity_tokens, tokenizer_digest
from orchestrator.cli import app
from orchestrator.spec import build_spec, resolve_executor


def test_an_fp32_request_is_not_answered_by_a_bf16_evaluation(tiny_dirs, shared_data, tmp_path, monkeypatch):
    from orchestrator.pruning.job import prune
    from orchestrator.results.store import read_store

    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    out = tmp_path / "run"
    prune(build_spec(model=str(tiny_dirs["llama"]), seqlen=32, nsamples=4, executor="local", out=str(out)))
    runner = CliRunner()

    def evaluate(dtype: str) -> dict:
        result = runner.invoke(app, ["eval", "--model", str(out), "--eval", "wikitext2", "--eval-windows", "4",
                                     "--dtype", dtype, "--data-dir", str(shared_data)])
        assert result.exit_code == 0, result.output
        assert f"windows, {dtype}" in result.output  # the summary names the dtype it was made in
        return json.loads((out / "run.json").read_text())

    bf16 = evaluate("bfloat16")
    fp32 = evaluate("float32")  # before: the bf16 number, returned in no time
    entries = {e["dtype"]: e for e in fp32["evaluations"]}
    assert set(entries) == {"bfloat16", "float32"}
    assert entries["bfloat16"]["eval_key"] != entries["float32"]["eval_key"]
    assert entries["bfloat16"]["value"] == bf16["perplexity"]["wikitext2"]
    assert entries["float32"]["value"] != entries["bfloat16"]["value"]  # computed anew: bf16 rounds differently
    again = evaluate("float32")  # on record now: nothing is computed
    assert again["evaluations"] == fp32["evaluations"]
    rows = [r for r in read_store(tmp_path / "store").table.to_pylist() if r["metric"] == "perplexity"]
    assert sorted(r["dtype"] for r in rows) == ["bfloat16", "float32"]


def test_token_streams_are_cached_on_disk_by_text_and_tokenizer(tiny_dirs, shared_data, tmp_path):
    from neuroal.models import load_tokenizer

    folder = tiny_dirs["llama"]
    tok = load_tokenizer(folder)
    cache = TokenCache(tmp_path, tokenizer_digest(folder))
    fresh, origin = perplexity_tokens("wikitext2", tok, 32, shared_data)
    first, _ = perplexity_tokens("wikitext2", tok, 32, shared_data, cache=cache)
    (file,) = tmp_path.glob("*.npy")
    assert torch.equal(first, fresh) and np.load(file, allow_pickle=False).shape == (fresh.numel(),)

    def no_tokenizer():
        raise AssertionError("a cached stream needs no tokenizer")

    cached, cached_origin = perplexity_tokens("wikitext2", no_tokenizer, 32, shared_data, cache=cache)
    assert torch.equal(cached, fresh) and cached_origin == origin
    other = TokenCache(tmp_path, "another tokenizer")
    assert other.get("x") is None and other.path("x") != cache.path("x")
    file.write_bytes(b"damaged")  # a damaged file is a miss, then rewritten
    again, _ = perplexity_tokens("wikitext2", tok, 32, shared_data, cache=cache)
    assert torch.equal(again, fresh) and torch.equal(cache.get(_text(shared_data)), fresh)


def _text(data):
    from neuroal.data import perplexity_text

    return perplexity_text("wikitext2", data)[0]


@pytest.mark.parametrize("address, shards, expected", [
    (None, 1, "local"),  # a one-off command on this machine: no Ray start
    (None, 2, "ray"),  # several shards: actors
    ("127.0.0.1:6379", 1, "ray"),  # a named cluster
])
def test_auto_executor(address, shards, expected):
    assert resolve_executor("auto", address=address, shards=shards) == expected
    assert build_spec(executor="auto", address=address, shards=shards).executor == expected
    assert build_spec(executor="ray", shards=shards).executor == "ray"  # named: kept
