"""A shard: a contiguous range of decoder blocks (plus embeddings / head at the ends) on one device.

`Shard` is a plain class, testable without Ray; the in-process run holds one (or several) of them
directly and the Ray path wraps the same class with `ray.remote` (`ray_chain.py`). It loads only
its own tensors, by name, from the safetensors checkpoint; all math is `neuroal.block`, driven per
block by a stream task (`orchestrator.tasks`). The driver calls its methods by reference
(`chain.call(i, Shard.embed, ids)`); everything they return is host data (`orchestrator.wire`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from neuroal.families import apply_head, block_linears, capture_block_inputs, family_for, get_blocks, linear_shapes
from neuroal.fileio import atomic_path, write_text_atomic
from neuroal.models import build_skeleton, load_config, materialize, resolve_model
from orchestrator.planning import ShardSpec
from orchestrator.tasks import ShardRun, StreamTask
from orchestrator.wire import from_wire, pack, to_host, to_wire, unpack

logger = logging.getLogger(__name__)


def two_results(fn):
    """Mark a method that returns (hidden states, record): on Ray each is its own object, so the
    hidden states go straight to the next actor while the driver fetches only the record."""
    fn.num_returns = 2
    return fn


class Shard:
    """Blocks [first_block, end_block) of one model, loaded tensor by tensor."""

    def __init__(
        self,
        model_dir: str | Path,
        spec: ShardSpec,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        resume_dir: str | Path | None = None,
    ):
        t0 = time.perf_counter()
        self.model_dir = resolve_model(str(model_dir))  # a name resolves on this node (hub cache, GGUF)
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.config = load_config(self.model_dir)
        self.family = family_for(self.config)
        self.model = build_skeleton(self.config)
        blocks_prefix = self.family.blocks + "."
        head = tuple(p + "." for p in self.family.head)
        mine = tuple(f"{blocks_prefix}{b}." for b in spec.blocks)

        def wanted(name: str) -> bool:
            if name.startswith(blocks_prefix):
                return name.startswith(mine)
            if name.startswith(head):
                return spec.has_head
            return spec.has_embeddings

        self.loaded = materialize(self.model, self.model_dir, wanted, dtype=self.dtype, device=self.device)
        if spec.has_head and not spec.has_embeddings:
            self._load_tied_input_embedding()
        self.blocks = get_blocks(self.model, self.family)
        self.shapes = linear_shapes(self.blocks[spec.first_block], self.family)
        self._kwargs: dict[int, dict] = {}
        self.on_block = None  # in-process progress callback (kind, block index)
        self.busy_seconds = 0.0  # time spent in `run` (pipeline utilisation = busy / wall)
        self.resume_path = (
            Path(resume_dir) / f"shard-{spec.first_block:04d}-{spec.end_block:04d}.safetensors" if resume_dir else None
        )
        self.pruned = self._load_checkpoint()
        self.load_seconds = time.perf_counter() - t0
        logger.info("shard %d: blocks %d..%d loaded in %.1fs", spec.index, spec.first_block, spec.end_block - 1, self.load_seconds)

    def _block_tensors(self) -> dict[str, Tensor]:
        prefix = tuple(f"{self.family.blocks}.{b}." for b in self.spec.blocks)
        return {n: p for n, p in self.model.named_parameters() if n.startswith(prefix)}

    def _load_checkpoint(self) -> bool:
        """Restore this shard's pruned blocks if an earlier attempt finished them (restart/rerun)."""
        if self.resume_path is None or not self.resume_path.exists():
            return False
        from safetensors.torch import load_file

        saved = load_file(str(self.resume_path))
        params = self._block_tensors()
        if set(saved) != set(params):
            logger.warning("shard %d: ignoring %s (it holds other tensors)", self.spec.index, self.resume_path)
            return False
        with torch.no_grad():
            for name, t in saved.items():
                params[name].copy_(t.to(params[name].dtype))
        logger.info("shard %d: restored pruned blocks from %s", self.spec.index, self.resume_path)
        return True

    def write_checkpoint(self) -> None:
        """Keep this shard's pruned blocks where a restarted actor or a rerun finds them."""
        if self.resume_path is None:
            return
        with atomic_path(self.resume_path) as tmp:
            save_file({n: p.detach().cpu().contiguous() for n, p in self._block_tensors().items()}, str(tmp))

    def _load_tied_input_embedding(self) -> None:
        """A tied head needs the input embedding matrix on the last shard too."""
        out_emb = self.model.get_output_embeddings()
        if out_emb is not None and out_emb.weight.device.type == "meta":
            in_name = self._input_embedding_name()
            materialize(self.model, self.model_dir, lambda n: n == in_name, dtype=self.dtype, device=self.device)
            out_emb.weight = self.model.get_input_embeddings().weight

    # ------------------------------------------------------------------ stream entry and exit

    def block_kwargs(self, seqlen: int) -> dict:
        """The keyword arguments every block takes for windows of `seqlen` (first shard only), packed."""
        assert self.spec.has_embeddings
        if seqlen not in self._kwargs:
            ids = torch.zeros(1, seqlen, dtype=torch.long, device=self.device)
            self._kwargs[seqlen] = capture_block_inputs(self.model, self.family, ids).kwargs
        return pack(self._kwargs[seqlen])

    def set_block_kwargs(self, seqlen: int, kwargs: dict) -> None:
        """State a restarted actor must be given again (the chain replays `configure` calls)."""
        self._kwargs[seqlen] = unpack(kwargs, self.device)

    def kwargs_for(self, b: int, hidden: Tensor | None) -> dict:
        """The kwargs block `b` is called with on these hidden states ({} when there are none)."""
        if hidden is None:
            return {}
        seqlen = hidden.shape[1]
        if seqlen not in self._kwargs:
            raise RuntimeError(f"shard {self.spec.index}: block kwargs for seqlen {seqlen} were never set")
        return self._kwargs[seqlen]

    def embed(self, input_ids: Tensor) -> tuple[np.ndarray, str]:
        """Hidden states entering block 0 for token ids [n, seqlen]."""
        assert self.spec.has_embeddings
        inputs = capture_block_inputs(self.model, self.family, input_ids.to(self.device))
        return to_wire(inputs.hidden.to(self.dtype))

    @torch.no_grad()
    def nll(self, wire, input_ids: Tensor) -> tuple[float, int]:
        """Σ over windows of (mean next-token NLL · seqlen), and the window count (last shard).

        This is the papers' perplexity accumulator (`eval_ppl_wikitext`): each window's mean loss
        over its seqlen−1 predictions, weighted by seqlen.
        """
        assert self.spec.has_head
        hidden = from_wire(wire, self.device)
        total = 0.0
        ids = input_ids.to(self.device)
        for i in range(hidden.shape[0]):  # one window at a time bounds the [seqlen, vocab] logits
            logits = apply_head(self.model, self.family, hidden[i : i + 1]).float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[i, 1:])
            total += loss.item() * ids.shape[1]
        return total, int(hidden.shape[0])

    # ------------------------------------------------------------------ the unit of work

    @two_results
    @torch.no_grad()
    def run(self, task: StreamTask, wire, partial: float = 0.0) -> tuple[tuple[np.ndarray, str] | None, ShardRun]:
        """Push one stream through this shard's blocks; returns its output and a host `ShardRun`."""
        t0 = time.perf_counter()
        try:
            hidden = from_wire(wire, self.device) if wire is not None else None
            run = ShardRun(partial=partial)
            for b in self.spec.blocks:
                hidden = task.run_block(self, b, hidden, run)
                if run.stopped_at is not None:
                    return None, to_host(run)
                if self.on_block is not None:
                    self.on_block(type(task).__name__.lower(), b)
            task.finish(self)
            return (to_wire(hidden) if hidden is not None else None), to_host(run)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ inspection and output

    def block_weights(self) -> dict[int, dict[str, Tensor]]:
        """The prunable weights of this shard's blocks, as CPU tensors (tests compare masks)."""
        return {
            b: {n: lin.weight.detach().cpu().clone() for n, lin in block_linears(self.blocks[b], self.family).items()}
            for b in self.spec.blocks
        }

    def loaded_bytes(self) -> int:
        """Bytes of the tensors this shard holds (its blocks, plus embeddings/head at the ends)."""
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def get_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.shapes)

    def report(self) -> dict:
        """What this shard did (run.json, benchmarks): its blocks, device, seconds and peak memory."""
        import resource

        return {"index": self.spec.index, "blocks": [self.spec.first_block, self.spec.end_block - 1],
                "device": str(self.device), "load_seconds": round(self.load_seconds, 2),
                "busy_seconds": round(self.busy_seconds, 3),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def weight_summaries(self, summary: Callable[[Tensor], float]) -> dict[int, dict[str, float]]:
        """`summary(W)` of every prunable linear of this shard, computed here (e.g. AlphaPruning's α)."""
        return {
            b: {n: summary(lin.weight.detach()) for n, lin in block_linears(self.blocks[b], self.family).items()}
            for b in self.spec.blocks
        }

    def save(self, folder: str | Path) -> dict[str, str]:
        """Write the tensors this shard loaded as one safetensors file; returns name -> file name.

        A tied output embedding is not written (as `save_pretrained`): the input embedding,
        written by the first shard, is the one tensor.
        """
        folder = Path(folder)
        fname = f"model-{self.spec.index + 1:05d}-of-{self.spec.n_shards:05d}.safetensors"
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(dict(self.model.named_buffers(remove_duplicate=False)))
        out_emb = self.model.get_output_embeddings()
        tied = getattr(self.config, "tie_word_embeddings", False) and out_emb is not None
        state = {}
        for name in self.loaded:
            if tied and params[name] is out_emb.weight and name != self._input_embedding_name():
                continue
            state[name] = params[name].detach().to("cpu").contiguous()
        with atomic_path(folder / fname) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        return {name: fname for name in state}

    def _input_embedding_name(self) -> str:
        emb = self.model.get_input_embeddings().weight
        return next(n for n, p in self.model.named_parameters(remove_duplicate=False) if p is emb)


def write_index(folder: Path, weight_maps: list[dict[str, str]], total_bytes: int) -> None:
    weight_map = {}
    for m in weight_maps:
        weight_map.update(m)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
