"""Packed loglikelihood scoring for lm-eval: each context runs once, with all its continuations.

A multiple-choice document sends k requests with one context; stock `HFLM` runs the context k times.
`packed_lm_class()` is stock `HFLM` with those requests laid out as `PackedRow`s (one sequence per
context, a 4D mask keeping the continuations apart), so every scored logit is the one stock HFLM gets,
up to float rounding; `neuroal.zeroshot` uses it unless `packed=False`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Model types whose `base_model` returns the final hidden states that `get_output_embeddings()` (then
# Gemma's `final_logit_softcapping`) maps to the CausalLM's logits, and whose attention takes a custom 4D
# mask with explicit `position_ids`; each is checked against stock `HFLM` in
# tests/neuroal/test_zeroshot_packing.py. Other models (Mamba, unknown types) are scored by stock HFLM.
PACKABLE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma2", "gemma3_text", "phi3", "opt", "phi", "gpt_neox"}
)
_PACKABLE_ATTENTION = frozenset({"eager", "sdpa"})  # flash / flex kernels ignore a dense 4D mask


@dataclass(frozen=True)
class PackedRow:
    """One context and all its continuations laid out as a single sequence.

    The context comes once, then each continuation without its last token (no logit is needed after
    it). Continuation tokens sit at the positions they would have after the context alone and attend
    only to the context and to earlier tokens of the same continuation, so every scored logit is the
    one stock HFLM gets from `context + continuation`, up to float rounding.
    """

    tokens: tuple[int, ...]  # [P] input ids
    positions: tuple[int, ...]  # [P] position ids
    segments: tuple[int, ...]  # [P] 0 = context, j + 1 = continuation j
    score_at: tuple[tuple[int, ...], ...]  # per continuation: indices whose next-token logits score it
    continuations: tuple[tuple[int, ...], ...]


def pack_row(context, continuations) -> PackedRow:
    """Lay out `context` (token ids) and its `continuations` as one `PackedRow`."""
    C = len(context)
    tokens, positions, segments, score_at = list(context), list(range(C)), [0] * C, []
    for j, cont in enumerate(continuations):
        start, n = len(tokens), len(cont) - 1
        tokens += cont[:-1]
        positions += range(C, C + n)
        segments += [j + 1] * n
        score_at.append((C - 1, *range(start, start + n)))
    return PackedRow(tuple(tokens), tuple(positions), tuple(segments), tuple(score_at),
                     tuple(tuple(c) for c in continuations))


def packed_batch(rows: list[PackedRow], dtype, device):
    """Right-padded `input_ids`, `position_ids` [B, P] and the additive attention mask [B, 1, P, P].

    A query attends to keys at or before it that are context or share its segment; padding forms its
    own segment (so no mask row is empty) that no real token sees.
    """
    import torch

    P = max(len(r.tokens) for r in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    pos = torch.zeros(len(rows), P, dtype=torch.long)
    seg = torch.full((len(rows), P), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        ids[b, :n] = torch.tensor(r.tokens)
        pos[b, :n] = torch.tensor(r.positions)
        seg[b, :n] = torch.tensor(r.segments)
    causal = torch.ones(P, P, dtype=torch.bool).tril()  # [q, k]
    allowed = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0))  # [B, q, k]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids.to(device), pos.to(device), mask[:, None].to(device)


def _context_groups(requests, max_len: int):
    """Requests grouped by context tokens; the ones too long to pack (stock truncation) kept apart.

    Returns ({context: {continuation: [request indices]}}, [indices left to stock HFLM]).
    """
    groups: dict[tuple, dict[tuple, list[int]]] = {}
    stock: list[int] = []
    for i, (_, ctx, cont) in enumerate(requests):
        if len(ctx) + len(cont) - 1 > max_len:
            stock.append(i)
        else:
            groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont), []).append(i)
    return groups, stock


def _row_batches(items: list, batch_size: int):
    """(PackedRow, payload) items longest row first (as lm-eval's Collator), cut into batches of about
    `batch_size` requests; a row (one context's continuations) is never split."""
    order = sorted(items, key=lambda item: (-len(item[0].tokens), item[0].tokens))
    batch, n = [], 0
    for item in order:
        if batch and n + len(item[0].continuations) > batch_size:
            yield batch
            batch, n = [], 0
        batch.append(item)
        n += len(item[0].continuations)
    if batch:
        yield batch


@functools.lru_cache(maxsize=1)
def packed_lm_class():
    import torch
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class PackedHFLM(HFLM):
        """Stock HFLM whose loglikelihood requests are scored as `PackedRow`s.

        Why: a multiple-choice document sends k requests with one context; stock HFLM runs the
        context k times and the 49k-word lm_head + log_softmax over every padded position. Here each
        context runs once with its k continuations in one row, and lm_head only sees the positions
        that are scored. Requests that stock HFLM would left-truncate, rolling-loglikelihood windows
        (they come with `override_bs`), `batch_size="auto"` and models outside `PACKABLE_MODEL_TYPES`
        take the stock path unchanged; `generate_until` and `loglikelihood_rolling` are stock HFLM's
        (wrapped only to hide their progress bars); `simple_evaluate`, the task YAMLs, metrics,
        filters and stderr are all stock lm-eval.
        """

        show_progress = False

        # the request types below run stock HFLM's code; only their progress bars follow `show_progress`
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

        @property
        def packable(self) -> bool:
            cfg = self.model.config
            return (
                self.backend == "causal"
                and getattr(cfg, "model_type", None) in PACKABLE_MODEL_TYPES
                and getattr(cfg, "_attn_implementation", None) in _PACKABLE_ATTENTION
                and self.model.base_model is not self.model
            )

        def _max_packed_len(self) -> int:
            window = getattr(self.model.config, "sliding_window", None)
            return min(self.max_length, window) if window else self.max_length

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if override_bs is not None or not isinstance(self.batch_size, int) or not self.packable:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            groups, stock = _context_groups(requests, self._max_packed_len())
            res: list = [None] * len(requests)
            if stock:
                for i, answer in zip(stock, super()._loglikelihood_tokens([requests[i] for i in stock], True)):
                    res[i] = answer
            # each row with, per continuation, the indices of the requests it answers (duplicates share one)
            items = [(pack_row(ctx, list(conts)), list(conts.values())) for ctx, conts in groups.items()]
            pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests")
            for batch in _row_batches(items, self.batch_size):
                answers = self._score_rows([row for row, _ in batch])
                for (_, owners), row_answers in zip(batch, answers):
                    for indices, answer in zip(owners, row_answers):
                        for i in indices:
                            res[i] = answer
                            if requests[i][0] is not None:
                                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                        pbar.update(len(indices))
            pbar.close()
            return res

        @torch.inference_mode()
        def _score_rows(self, rows: list[PackedRow]) -> list[list[tuple[float, bool]]]:
            """(sum of continuation log-probs, all tokens greedy) per continuation of each row."""
            model = self.model
            dtype = self.mixed_precision_dtype or model.dtype
            ids, pos, mask = packed_batch(rows, dtype, self.device)
            with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                enabled=self.mixed_precision_dtype is not None):
                hidden = model.base_model(input_ids=ids, position_ids=pos, attention_mask=mask,
                                          use_cache=False).last_hidden_state  # [B, P, H]
                P = ids.shape[1]
                flat = [b * P + k for b, r in enumerate(rows) for at in r.score_at for k in at]
                target = [t for r in rows for cont in r.continuations for t in cont]
                h = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(flat, device=self.device)]  # [N, H]
                logits = model.get_output_embeddings()(h)  # [N, V]
                cap = getattr(model.config, "final_logit_softcapping", None)
                if cap:  # as Gemma's CausalLM forward
                    logits = torch.tanh(logits / cap) * cap
            if self.softmax_dtype is not None:
                logits = logits.to(self.softmax_dtype)
            # log_softmax at the target only: logit - logsumexp, without writing the [N, V] log-probs
            target = torch.tensor(target, device=self.device)
            token_lp = logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)  # [N]
            greedy = logits.argmax(dim=-1) == target
            token_lp, greedy = token_lp.tolist(), greedy.tolist()  # one device sync per batch
            out, s = [], 0
            for r in rows:
                answers = []
                for cont in r.continuations:
                    e = s + len(cont)
                    answers.append((sum(token_lp[s:e]), all(greedy[s:e])))
                    s = e
                out.append(answers)
            return out

    return PackedHFLM
