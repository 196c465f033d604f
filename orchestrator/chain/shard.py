"""A shard: a contiguous range of decoder blocks (plus embeddings / head at the ends) on one device.

`Shard` is a plain class, testable without Ray; the in-process run holds one (or several) of them
directly and the Ray path wraps the same class with `ray.remote` (`orchestrator.chain.actors`). It loads only
its own tensors, by name, from the safetensors checkpoint; all math is `neuroal.block`, driven per
block by a stream task (`orchestrator.chain.passes`). The driver calls its methods by reference
(`chain.call(i, Shard.embed, ids)`); everything they return is host data (`orchestrator.chain.wire`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from neuroal import fileio
from neuroal.block_forward import apply_head, capture_block_inputs
from neuroal.devices import dtype_name, resolve_device, resolve_dtype
from neuroal.evaluation import nll_sum
from neuroal.families import family_for, get_blocks
from neuroal.host_memory import keep_freed_host_memory
from neuroal.models import (
    build_skeleton,
    load_config,
    materialize,
    resolve_model,
    weight_fetcher,
)
from neuroal.prunable import block_linears, linear_shapes
from orchestrator.chain.offload import BlockResidency
from orchestrator.planning import ShardSpec
from orchestrator.chain.passes import ShardRun, StreamTask
from orchestrator.chain.wire import from_wire, pack, to_host, to_wire, unpack

logger = logging.getLogger(__name__)


class ShardStateLost(RuntimeError):
    """A call reached a (restarted) shard that lacks state the driver gave it: replay, then retry."""


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
        dtype: str = "auto",
        device: str = "auto",
        resume_dir: str | Path | None = None,
        gpu_given: bool = False,
        offload: str = "none",
        budget: int | None = None,
    ):
        t0 = time.perf_counter()
        # a name resolves on this node (hub cache, object storage, GGUF); weight files come on demand
        self.model_dir = resolve_model(str(model_dir), weights=False)
        self._fetch = weight_fetcher(str(model_dir))
        self.spec = spec
        self.device = resolve_device(device, gpu_given=gpu_given)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu":  # a CPU pass re-allocates the same large buffers every batch
            keep_freed_host_memory()
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

        # offloaded blocks are read to the host; only what stays resident goes to the device
        self.loaded = materialize(self.model, self.model_dir, wanted, dtype=self.dtype,
                                  device="cpu" if offload != "none" else self.device, fetch=self._fetch)
        if spec.has_head and not spec.has_embeddings:
            self._load_tied_input_embedding()
        self.blocks = get_blocks(self.model, self.family)
        self.shapes = linear_shapes(self.blocks[spec.first_block], self.family)
        self._kwargs: dict[int, list[dict]] = {}  # seqlen -> kwargs of every block of the model
        self.on_block = None  # in-process progress callback (kind, block index)
        self.busy_seconds = 0.0  # time spent in `run` (pipeline utilisation = busy / wall)
        name = f"shard-{spec.first_block:04d}-{spec.end_block:04d}.safetensors"
        self.resume_path = fileio.join(resume_dir, name) if resume_dir else None  # a local path or a URI
        self.pruned = self._load_checkpoint()
        self.residency = None
        if offload != "none":
            self._residents_to_device()
            block_ids = {id(p) for b in spec.blocks for p in self.blocks[b].parameters()}
            persistent = sum(t.numel() * t.element_size() for t in self._unique_tensors() if id(t) not in block_ids)
            self.residency = BlockResidency({b: self.blocks[b] for b in spec.blocks}, self.device, offload,
                                            persistent_bytes=persistent, budget=budget)
        self.load_seconds = time.perf_counter() - t0
        logger.info("shard %d: blocks %d..%d loaded in %.1fs", spec.index, spec.first_block, spec.end_block - 1, self.load_seconds)

    def _block_tensors(self) -> dict[str, Tensor]:
        prefix = tuple(f"{self.family.blocks}.{b}." for b in self.spec.blocks)
        return {n: p for n, p in self.model.named_parameters() if n.startswith(prefix)}

    def _unique_tensors(self) -> list[Tensor]:
        seen, out = set(), []
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def _residents_to_device(self) -> None:
        """An offloaded shard keeps its non-block tensors (embeddings, head, norms, rotary tables) on the device."""
        block_ids = {id(p) for b in self.spec.blocks for p in self.blocks[b].parameters()}
        for t in self._unique_tensors():
            if id(t) not in block_ids:
                t.data = t.data.to(self.device)

    def _resident(self, b: int, kind: str, write_back: bool = False):
        """Block b on the device for one pass (a no-op unless the shard is offloaded)."""
        if self.residency is None:
            return contextlib.nullcontext()
        return self.residency.on_device(b, kind=kind, write_back=write_back)

    def _block_state(self) -> dict[str, Tensor]:
        """Every block parameter of this shard as a CPU tensor (offloaded blocks brought back to read)."""
        out = {}
        prefix = self.family.blocks
        for b in self.spec.blocks:
            with self._resident(b, "io"):
                out.update({f"{prefix}.{b}.{n}": p.detach().to("cpu").contiguous()
                            for n, p in self.blocks[b].named_parameters()})
        return out

    def _load_checkpoint(self) -> bool:
        """Restore this shard's pruned blocks if an earlier attempt finished them (restart/rerun)."""
        if self.resume_path is None or not fileio.exists(self.resume_path):
            return False
        from safetensors.torch import load, load_file

        try:  # safetensors holds tensors only: a damaged or foreign file is ignored, never trusted
            if fileio.is_uri(self.resume_path):
                fs, path = fileio.filesystem(self.resume_path)
                saved = load(fs.cat_file(path))
            else:
                saved = load_file(self.resume_path)
        except Exception as exc:
            logger.warning("shard %d: ignoring %s (unreadable: %s)", self.spec.index, self.resume_path, exc)
            return False
        params = self._block_tensors()
        if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
            logger.warning("shard %d: ignoring %s (it holds other tensors)", self.spec.index, self.resume_path)
            return False
        with torch.no_grad():
            for name, t in saved.items():
                params[name].copy_(t.to(params[name].dtype))
        logger.info("shard %d: restored pruned blocks from %s", self.spec.index, self.resume_path)
        return True

    def finish_pruning(self) -> None:
        """The final pass went through every block: checkpoint them once, and never prune them again."""
        if not self.pruned:
            self.write_checkpoint()
            self.pruned = True

    def write_checkpoint(self) -> None:
        """Keep this shard's pruned blocks where a restarted actor or a rerun finds them."""
        if self.resume_path is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "checkpoint.safetensors"
            save_file(self._block_state(), str(local))
            fileio.put_file(local, self.resume_path)

    def _load_tied_input_embedding(self) -> None:
        """A tied head needs the input embedding matrix on the last shard too."""
        out_emb = self.model.get_output_embeddings()
        if out_emb is not None and out_emb.weight.device.type == "meta":
            in_name = self._input_embedding_name()
            materialize(self.model, self.model_dir, lambda n: n == in_name, dtype=self.dtype, device=self.device,
                        fetch=self._fetch)
            out_emb.weight = self.model.get_input_embeddings().weight

    # ------------------------------------------------------------------ stream entry and exit

    def block_kwargs(self, seqlen: int) -> dict:
        """The keyword arguments each block takes for windows of `seqlen` (first shard only), packed.

        Blocks may differ (Gemma's sliding-window and global layers get other masks and rotary tables).
        """
        assert self.spec.has_embeddings
        if seqlen not in self._kwargs:
            ids = torch.zeros(1, seqlen, dtype=torch.long, device=self.device)
            self._kwargs[seqlen] = capture_block_inputs(self.model, self.family, ids).layer_kwargs
        return pack(self._kwargs[seqlen])  # one dict per block; shared dicts and tensors travel once

    def set_block_kwargs(self, seqlen: int, kwargs: dict) -> None:
        """State a restarted actor must be given again (the chain replays `configure` calls)."""
        self._kwargs[seqlen] = unpack(kwargs, self.device)

    def kwargs_for(self, b: int, hidden: Tensor | None) -> dict:
        """The kwargs block `b` is called with on these hidden states ({} when there are none)."""
        if hidden is None:
            return {}
        seqlen = hidden.shape[1]
        if seqlen not in self._kwargs:
            raise ShardStateLost(f"shard {self.spec.index}: block kwargs for seqlen {seqlen} were never set")
        return self._kwargs[seqlen][b]

    def embed(self, input_ids: Tensor) -> tuple[np.ndarray, str]:
        """Hidden states entering block 0 for token ids [n, seqlen]."""
        assert self.spec.has_embeddings
        inputs = capture_block_inputs(self.model, self.family, input_ids.to(self.device))
        return to_wire(inputs.hidden.to(self.dtype))

    @torch.no_grad()
    def nll(self, wire, input_ids: Tensor) -> tuple[float, int]:
        """Σ over windows of (mean next-token NLL · seqlen), and the window count (last shard).

        This is the papers' perplexity accumulator (`eval_ppl_wikitext`): each window's mean loss
        over its seqlen−1 predictions, weighted by seqlen; the head runs on chunks of positions
        (`neuroal.evaluation.nll_sum`), never on [batch, seqlen, vocab] at once.
        """
        assert self.spec.has_head
        hidden = from_wire(wire, self.device)
        total = nll_sum(lambda h: apply_head(self.model, self.family, h), hidden, input_ids.to(self.device))
        return total, int(hidden.shape[0])

    # ------------------------------------------------------------------ the unit of work

    @two_results
    @torch.no_grad()
    def run(self, task: StreamTask, wire, partial: float = 0.0) -> tuple[tuple[np.ndarray, str] | None, ShardRun]:
        """Push one stream through this shard's blocks; returns its output and a host `ShardRun`."""
        outs, runs = self.run_many([task], [wire], [partial])
        return outs[0], runs[0]

    @two_results
    @torch.no_grad()
    def run_many(self, tasks: list[StreamTask], wires: list, partials: list[float]) -> tuple[list, list[ShardRun]]:
        """Several streams block-major: all of them through block b, then b+1, so an offloaded block
        moves to the device once per call. Each stream's arithmetic is that of `run` on its own.

        Returns:
            (outputs in wire form, None for a stream that stopped; host `ShardRun`s).
        """
        t0 = time.perf_counter()
        try:
            if not isinstance(wires, list):  # one input shared by every stream
                wires = [wires] * len(tasks)
            hidden = [from_wire(w, self.device) if w is not None else None for w in wires]
            runs = [ShardRun(partial=p) for p in partials]
            live = list(range(len(tasks)))
            kind = type(tasks[0]).__name__.lower()
            for b in self.spec.blocks:
                with self._resident(b, kind, write_back=any(t.mutates for t in tasks)):
                    for i in live:
                        hidden[i] = tasks[i].run_block(self, b, hidden[i], runs[i])
                live = [i for i in live if runs[i].stopped_at is None]
                for i in range(len(tasks)):
                    if runs[i].stopped_at is not None:
                        hidden[i] = None
                if not live:
                    break
                if self.on_block is not None:
                    self.on_block(kind, b)
            for i in live:
                tasks[i].finish(self)
            return [to_wire(h) if h is not None else None for h in hidden], [to_host(r) for r in runs]
        finally:
            self.busy_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ inspection and output

    def block_weights(self) -> dict[int, dict[str, Tensor]]:
        """The prunable weights of this shard's blocks, as CPU tensors (tests compare masks)."""
        out = {}
        for b in self.spec.blocks:
            with self._resident(b, "io"):
                out[b] = {n: lin.weight.detach().cpu().clone() for n, lin in block_linears(self.blocks[b], self.family).items()}
        return out

    def loaded_bytes(self) -> int:
        """Bytes of the tensors this shard holds in memory (its blocks, plus embeddings/head at the ends)."""
        return sum(t.numel() * t.element_size() for t in self._unique_tensors())

    def get_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.shapes)

    def report(self) -> dict:
        """What this shard did (run.json, benchmarks): its blocks, device, seconds and peak memory."""
        import resource

        return {"index": self.spec.index, "blocks": [self.spec.first_block, self.spec.end_block - 1],
                "device": str(self.device), "dtype": dtype_name(self.dtype), "load_seconds": round(self.load_seconds, 2),
                "busy_seconds": round(self.busy_seconds, 3),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_device_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
                "offload": self.residency.report() if self.residency is not None else None}

    def weight_summaries(self, summary: Callable[[Tensor], float]) -> dict[int, dict[str, float]]:
        """`summary(W)` of every prunable linear of this shard, computed here (e.g. AlphaPruning's α)."""
        out = {}
        for b in self.spec.blocks:
            with self._resident(b, "weights"):
                out[b] = {n: summary(lin.weight.detach()) for n, lin in block_linears(self.blocks[b], self.family).items()}
        return out

    def save(self, target: str | None) -> dict:
        """Write the tensors this shard loaded as one safetensors file.

        A tied output embedding is not written (as `save_pretrained`): the input embedding,
        written by the first shard, is the one tensor.

        Args:
            target: the run folder (local or a URI) to write into; None returns the file's bytes
                instead (a Ray actor whose driver's folder is on another machine).

        Returns:
            {"weight_map": tensor name -> file name, "file": the file name, "bytes": its size,
            "data": the file's bytes when `target` is None}.
        """
        fname = f"model-{self.spec.index + 1:05d}-of-{self.spec.n_shards:05d}.safetensors"
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(dict(self.model.named_buffers(remove_duplicate=False)))
        out_emb = self.model.get_output_embeddings()
        tied = getattr(self.config, "tie_word_embeddings", False) and out_emb is not None
        state, blocks = {}, self._block_state() if self.residency is not None else {}
        for name in self.loaded:
            if tied and params[name] is out_emb.weight and name != self._input_embedding_name():
                continue
            state[name] = blocks[name] if name in blocks else params[name].detach().to("cpu").contiguous()
        part = {"weight_map": {name: fname for name in state}, "file": fname, "local": None}
        if target is None:  # kept on this node until the driver has pulled it (`read_bytes`, `drop_file`)
            local = Path(tempfile.mkdtemp(prefix="neuroal-part-")) / fname
            save_file(state, str(local), metadata={"format": "pt"})
            part["bytes"], part["local"] = local.stat().st_size, str(local)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / fname
                save_file(state, str(local), metadata={"format": "pt"})
                part["bytes"] = local.stat().st_size
                fileio.put_file(local, fileio.join(target, fname))
        return part

    def read_bytes(self, path: str, offset: int, size: int) -> bytes:
        """One chunk of a file `save` left on this node: the driver pulls a shard's file piece by
        piece, so neither side ever holds a whole shard's bytes in memory."""
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def drop_file(self, path: str) -> None:
        shutil.rmtree(Path(path).parent, ignore_errors=True)

    def _input_embedding_name(self) -> str:
        emb = self.model.get_input_embeddings().weight
        return next(n for n, p in self.model.named_parameters(remove_duplicate=False) if p is emb)

