"""Packed loglikelihood scoring (`neuroal.zeroshot_packing`): the layout and mask by hand, and, for every family's
tiny model, the same (loglikelihood, is_greedy) per request as stock lm-eval `HFLM`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from neuroal.zeroshot import default_batch_size
from neuroal.zeroshot_packing import PACKABLE_MODEL_TYPES, pack_row, packed_batch, packed_lm_class

FAMILIES = ["llama", "llama_gqa", "mistral", "qwen2", "qwen3", "opt", "phi", "gpt_neox", "mamba",
            "gemma2", "gemma3_text", "phi3", "olmo2"]


# ----------------------------------------------------------------------------- layout, by hand


def test_pack_row_layout():
    row = pack_row([5, 6, 7], [[8, 9], [10], [11, 12, 13]])
    # context once, then each continuation without its last token
    assert row.tokens == (5, 6, 7, 8, 11, 12)
    assert row.positions == (0, 1, 2, 3, 3, 4)
    assert row.segments == (0, 0, 0, 1, 3, 3)
    # logits predicting each continuation token: the last context token, then its own tokens
    assert row.score_at == ((2, 3), (2,), (2, 4, 5))
    assert row.continuations == ((8, 9), (10,), (11, 12, 13))


def test_packed_batch_mask_and_padding():
    rows = [pack_row([1, 2], [[3, 4], [5, 6]]), pack_row([7], [[8]])]
    ids, pos, mask = packed_batch(rows, torch.float32, "cpu")
    assert ids.tolist() == [[1, 2, 3, 5], [7, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 2], [0, 0, 0, 0]]
    assert mask.shape == (2, 1, 4, 4)
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0],
                          [1, 1, 0, 0],
                          [1, 1, 1, 0],   # continuation 0 sees the context and itself
                          [1, 1, 0, 1]]   # continuation 1 does not see continuation 0
    assert allowed[1] == [[1, 0, 0, 0],   # the real token never sees padding
                          [1, 1, 0, 0],   # padding: its own segment (no empty row)
                          [1, 1, 1, 0],
                          [1, 1, 1, 1]]
    assert mask.min() == torch.finfo(torch.float32).min


def test_default_batch_size_by_device():
    assert default_batch_size("cpu") == default_batch_size(torch.device("cpu"))
    assert default_batch_size("cuda:1") == default_batch_size("cuda") > default_batch_size("cpu")
    assert default_batch_size("mps") == default_batch_size("cpu")


# ----------------------------------------------------------------------------- same answers as stock HFLM


def _greedy(model, ctx, n):
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


def _requests(model):
    """Multiple-choice-like requests: shared contexts, one-token and multi-token continuations, a
    duplicate, a greedy continuation, a context that is a prefix of another, one context per request."""
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(1, 1000, (n,), generator=g).tolist()

    a, b, c = toks(12), toks(7), toks(5)
    conts_a = [toks(3), toks(1), toks(5), toks(2)]
    reqs = [(a, x) for x in conts_a] + [(a, conts_a[0])]  # duplicate request
    reqs += [(b, toks(1)), (b, toks(1))]  # boolq-like: one-token answers
    reqs += [(c, _greedy(model, c, 3)), (c, toks(3))]
    reqs += [(a[:6], conts_a[2])]  # prefix of another context: its own row
    reqs += [(toks(n), toks(2)) for n in (3, 9, 4)]  # winogrande-like: a context per request
    reqs += [(toks(2), toks(2)), (toks(3), toks(1))]  # short enough for the tiny Gemmas' window of 8
    return [((f"ctx{i}", f"cont{i}"), ctx, cont) for i, (ctx, cont) in enumerate(reqs)]


def _stock_and_packed(model, tokenizer, batch_size, **kw):
    from lm_eval.models.huggingface import HFLM

    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, **kw)
    packed = packed_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)
    return stock, packed


def _assert_same(got, expect, atol=1e-4):
    assert len(got) == len(expect)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expect):
        assert isinstance(ll, float) and isinstance(greedy, bool)
        assert ll == pytest.approx(ll_ref, abs=atol)
        assert greedy == greedy_ref


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_equals_stock_hflm(name, tiny_dirs, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).eval()
    reqs = _requests(model)
    stock, packed = _stock_and_packed(model, smollm2_tokenizer, batch_size=4)
    assert packed.packable == (model.config.model_type in PACKABLE_MODEL_TYPES)
    assert packed.packable == (name != "mamba")
    expect = stock._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert any(greedy for _, greedy in expect)  # the greedy path is exercised
    for batch_size in (4, 64):  # rows split over batches, and all in one padded batch
        packed.batch_size_per_gpu = batch_size
        _assert_same(packed._loglikelihood_tokens(reqs, disable_tqdm=True), expect)


def test_requests_stock_would_truncate_take_the_stock_path(tiny_dirs, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    reqs = _requests(model)
    stock, packed = _stock_and_packed(model, smollm2_tokenizer, batch_size=8, max_length=10)
    assert any(len(ctx) + len(cont) > 11 for _, ctx, cont in reqs)
    _assert_same(packed._loglikelihood_tokens(reqs, disable_tqdm=True),
                 stock._loglikelihood_tokens(reqs, disable_tqdm=True))


def test_eager_attention_is_packed_too(tiny_dirs, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], attn_implementation="eager").eval()
    reqs = _requests(model)
    stock, packed = _stock_and_packed(model, smollm2_tokenizer, batch_size=8)
    assert packed.packable
    _assert_same(packed._loglikelihood_tokens(reqs, disable_tqdm=True),
                 stock._loglikelihood_tokens(reqs, disable_tqdm=True))
