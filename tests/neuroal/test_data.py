"""Calibration windows and perplexity streams: protocol, local files, ready token ids, errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from neuroal.data import calibration_windows, load_documents, perplexity_tokens, perplexity_windows, resolve_data_dir
from neuroal.errors import DataError, SpecError


def test_wikitext_rows_match_the_hub_loader(shared_data):
    docs = load_documents("wikitext2", "test", shared_data)
    assert len(docs.docs) == 4358
    assert docs.docs[0] == "" and docs.docs[1] == " = Robert Boulter = \n"


def test_calibration_is_seeded_and_the_search_set_is_its_prefix(shared_data, smollm2_tokenizer):
    a, origin = calibration_windows("c4", smollm2_tokenizer, 16, 256, 0, shared_data)
    b, _ = calibration_windows("c4", smollm2_tokenizer, 8, 256, 0, shared_data)
    c, _ = calibration_windows("c4", smollm2_tokenizer, 8, 256, 1, shared_data)
    assert a.shape == (16, 256) and a.dtype == torch.long and "c4" in origin
    assert torch.equal(a[:8], b)  # NeuroAL's 8 search windows are the first 8 of the set
    assert not torch.equal(b, c)


def test_calibration_too_short_is_a_clear_error(shared_data, smollm2_tokenizer):
    with pytest.raises(DataError, match="no document .* longer than --seqlen 100000"):
        calibration_windows("c4", smollm2_tokenizer, 2, 100000, 0, shared_data)


def test_user_text_files(tmp_path, smollm2_tokenizer):
    txt = tmp_path / "book.txt"
    txt.write_text("word " * 3000)
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": "token " * 700}) for _ in range(3)))
    pqf = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha beta " * 400] * 2}), pqf)
    for f in (txt, jl, pqf):
        w, origin = calibration_windows(str(f), smollm2_tokenizer, 4, 128, 0, None)
        assert w.shape == (4, 128) and str(f) in origin
    ids, _ = perplexity_tokens(str(txt), smollm2_tokenizer, 128, None)
    assert perplexity_windows(ids, 128).shape[1] == 128


@pytest.mark.parametrize("fmt", ["pt", "npy", "parquet"])
def test_ready_token_ids_are_used_as_is(tmp_path, fmt, smollm2_tokenizer):
    ids = torch.randint(0, 1000, (5, 64))
    path = tmp_path / f"calib.{fmt}"
    if fmt == "pt":
        torch.save(ids, path)
    elif fmt == "npy":
        np.save(path, ids.numpy())
    else:
        pq.write_table(pa.table({"input_ids": ids.tolist()}), path)
    got, origin = calibration_windows(str(path), smollm2_tokenizer, 4, 64, 0, None)
    assert torch.equal(got, ids[:4]) and "ready token ids" in origin
    with pytest.raises(DataError, match=r"shape \(5, 64\).*--seqlen 32"):
        calibration_windows(str(path), smollm2_tokenizer, 4, 32, 0, None)


def test_missing_files_are_clear_errors(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataError, match="ptb test needs .*ptb.test.txt"):
        perplexity_tokens("ptb", smollm2_tokenizer, 128, tmp_path)
    with pytest.raises(DataError, match="c4 needs JSON-lines files"):
        calibration_windows("c4", smollm2_tokenizer, 4, 128, 0, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        calibration_windows(str(tmp_path / "nope.jsonl"), smollm2_tokenizer, 4, 128, 0, None)
    with pytest.raises(DataError, match="data-dir"):
        resolve_data_dir(tmp_path / "missing")
    with pytest.raises(SpecError, match="dataset"):
        load_documents("wikitext103", "test", tmp_path)


def test_local_ptb_layout(tmp_path, smollm2_tokenizer):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" the cat sat\n a dog ran\n" * 200)
    ids, origin = perplexity_tokens("ptb", smollm2_tokenizer, 64, tmp_path)
    assert origin.endswith("ptb.test.txt")
    text = " ".join([" the cat sat", " a dog ran"] * 200)
    assert ids.tolist() == smollm2_tokenizer(text).input_ids


def test_hub_path_fails_offline_with_a_hint(monkeypatch, smollm2_tokenizer):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline, pass --data-dir"):
        perplexity_tokens("wikitext2", smollm2_tokenizer, 128, None)
