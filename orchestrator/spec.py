"""`PruneSpec`: the validated flags of one prune (config at the edge; below it, typed parameters).

Every bad value becomes one `SpecError` line naming the flag and the allowed values.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from neuroal.allocation import ALLOCATORS, check_nm
from neuroal.allocation.neuroal import STEPS
from neuroal.data import DATA_VERSION, DATASETS
from neuroal.errors import SpecError
from neuroal.methods import METHODS, PATTERNS, parse_pattern
from neuroal.refiners import REFINERS
from orchestrator.planning.offloaded import OFFLOAD_MODES

GRID_VERSION = "1"  # bump when what a cell key covers changes; recorded with every result


def _knob_fields() -> tuple[str, ...]:
    """The spec fields every registered allocator and refiner reads (they change the result)."""
    classes = [ALLOCATORS.get(n) for n in ALLOCATORS.names()] + [REFINERS.get(n) for n in REFINERS.names()]
    return tuple(dict.fromkeys(f for c in classes for f in c.knobs.values()))


# PruneSpec fields besides the grid axes that change the pruned model (not where or how fast it ran)
NOT_RESULT = ("neuroal_tie_check",)  # knobs that only add checks; the pruned model is the same
RESULT_KNOBS = ("blocksize", "percdamp", "dtype", "moe_calibrate_all_experts", "moe_min_tokens",
                *(k for k in _knob_fields() if k not in NOT_RESULT))


OFFLOAD_CHOICES = ("auto", "none", *OFFLOAD_MODES)  # --offload: auto (when the blocks do not fit), none, cpu, disk


def check_sparsity(value: float, field: str) -> float:
    """A sparsity is a fraction strictly between 0 and 1 (the one rule for flags, grids and plans)."""
    if not 0.0 < value < 1.0:
        raise SpecError(field, value, "a fraction strictly between 0 and 1")
    return value


def check_datasets(names, field: str) -> tuple[str, ...]:
    """Perplexity datasets: a known name or a file (with an extension); the one rule for flags and grids."""
    for name in names:
        if name not in DATASETS and "." not in name:
            close = difflib.get_close_matches(name, DATASETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(field, name, ", ".join(DATASETS) + ", a .txt/.jsonl/.parquet file" + hint)
    return tuple(names)


def _name_list(v) -> tuple[str, ...]:
    """A comma list ("a,b") or a sequence of names, stripped, empties dropped."""
    if v is None:
        return ()
    if isinstance(v, str):
        v = v.split(",")
    return tuple(x.strip() for x in v if x.strip())


class PruneSpec(BaseModel):
    """One prune: the CLI contract of DESIGN §1 plus tuning knobs with the papers' defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "smollm2-135m"
    method: str = "wanda"
    top_up: str = "uniform"
    neuroal_step: Literal["block", "row", "both"] = "both"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    granularity: Literal["row", "layer"] = "row"
    calibration: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    eval: tuple[str, ...] = ()
    eval_dense: bool = False
    eval_windows: int | None = None  # evaluate only the first N windows (None: all, the papers' protocol)
    zeroshot: tuple[str, ...] = ()  # lm-eval tasks, groups or tags run on the saved checkpoint
    zeroshot_limit: int | None = None
    zeroshot_include: str | None = None  # a folder of the user's lm-eval task YAMLs (lm-eval's --include_path)
    num_fewshot: int = 0  # examples per zero-shot prompt (lm-eval's --num_fewshot)
    data_dir: str | None = None
    out: str | None = None
    shards: int = 1
    gpu_mem: str | None = None  # per-actor memory budget for the shard plan, e.g. "80GB"
    offload: Literal[OFFLOAD_CHOICES] = "auto"  # blocks that do not fit --gpu-mem wait on host/disk
    address: str | None = None
    executor: Literal["ray", "local", "auto"] = "ray"  # auto: `resolve_executor` (eval's default)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: the GPU Ray (or this machine) gives, else CPU
    # method and top-up knobs (defaults from the papers' code)
    blocksize: int = 128
    percdamp: float = 0.01
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    alpha_epsilon: float = 0.3
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_same_sign: bool = False  # the DSnoT paper's rule; the reference code never applies it
    dsnot_skip_mlp: bool = True  # the reference refines attention linears only
    search_windows: int = 8
    neuroal_tie_check: bool = True  # re-score each step's best two in reverse window order: is the choice in the noise?
    neuroal_tie_rule: Literal["lowest", "reference-order"] = "lowest"  # a near tie: the lowest score, or the earlier λ
    moe_calibrate_all_experts: bool = False  # every expert's statistics over all tokens (else its routed ones)
    moe_min_tokens: int = 1  # an expert routed fewer calibration tokens in a block is calibrated on all of them
    early_stop: bool = True
    max_tokens: int | None = None  # tokens per block call (default: 2048 on CPU, 32768 on GPU)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return METHODS.canonical(v)

    @field_validator("top_up")
    @classmethod
    def _top_up(cls, v: str) -> str:
        return ALLOCATORS.canonical(v)

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        return check_sparsity(v, "--sparsity")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        p = parse_pattern(v)
        return "unstructured" if p is None else str(p)

    @field_validator("nsamples", "seqlen", "shards", "search_windows", "blocksize", "max_tokens", "moe_min_tokens",
                     "eval_windows", "zeroshot_limit")
    @classmethod
    def _positive(cls, v: int | None, info) -> int | None:
        if v is not None and v < 1:
            raise SpecError("--" + info.field_name.replace("_", "-"), v, "a positive integer")
        return v

    @field_validator("gpu_mem")
    @classmethod
    def _gpu_mem(cls, v: str | None) -> str | None:
        from orchestrator.planning.sizes import parse_bytes

        if v is not None:
            parse_bytes(v)  # a size it cannot read is an error, never "does not fit: offload"
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
            raise SpecError("--device", v, "auto, cpu, cuda, cuda:N")
        return v

    @field_validator("eval", mode="before")
    @classmethod
    def _eval(cls, v) -> tuple[str, ...]:
        return check_datasets(_name_list(v), "--eval")

    @field_validator("zeroshot", mode="before")
    @classmethod
    def _zeroshot(cls, v) -> tuple[str, ...]:
        return _name_list(v)  # checked against lm-eval's tasks and --zeroshot-include's with both known

    @field_validator("zeroshot_include")
    @classmethod
    def _zeroshot_include(cls, v: str | None) -> str | None:
        return None if v is None else zeroshot_folder(v, "--zeroshot-include")

    @field_validator("num_fewshot")
    @classmethod
    def _num_fewshot(cls, v: int) -> int:
        if v < 0:
            raise SpecError("--num-fewshot", v, "a non-negative integer")
        return v

    @model_validator(mode="before")
    @classmethod
    def _executor(cls, data):
        if isinstance(data, dict) and data.get("executor") == "auto":
            data = dict(data, executor=resolve_executor("auto", address=data.get("address"), shards=data.get("shards", 1)))
        return data

    @model_validator(mode="after")
    def _zeroshot_names(self) -> PruneSpec:
        from neuroal.zeroshot import check_tasks

        if self.zeroshot:
            check_tasks(self.zeroshot, self.zeroshot_include, field="--zeroshot")
        return self

    @model_validator(mode="after")
    def _combinations(self) -> PruneSpec:
        pattern = parse_pattern(self.pattern)
        method = METHODS.get(self.method)
        allocator = ALLOCATORS.get(self.top_up)
        if pattern is not None:
            if abs(self.sparsity - pattern.sparsity) > 1e-9 and "sparsity" in self.model_fields_set:
                raise SpecError("--sparsity", self.sparsity, f"{pattern.sparsity} with --pattern {pattern} (or leave it out)")
            check_nm(self.top_up)
        if self.granularity == "layer" and method.solver is not None:
            raise SpecError("--granularity", "layer", f"row with --method {self.method} (its solver chooses the mask)")
        fields = self.model_dump()
        allocator.check(fields, set(self.model_fields_set))
        windows = allocator.from_fields(fields).evidence_windows
        if windows is not None and self.nsamples < windows:
            raise SpecError("--nsamples", self.nsamples, f"at least search_windows ({windows}, `--set search_windows=N`) for --top-up {self.top_up}")
        return self

    @property
    def effective_sparsity(self) -> float:
        p = parse_pattern(self.pattern)
        return p.sparsity if p is not None else self.sparsity

    def plugins(self) -> dict[str, str | None]:
        """{distribution: version} of the installed packages the method and top-up come from (`neuroal.plugins`);
        empty when both are built in."""
        out = {}
        for registry, name in ((METHODS, self.method), (ALLOCATORS, self.top_up)):
            origin = registry.origin(name)
            if origin is not None:
                out[origin.distribution] = origin.version
        return out

    def cell_key(self) -> str:
        """Hash of what defines the result (DESIGN §6): not where or how fast it ran.

        A plug-in method or top-up (`package.module:object`) is keyed by that name and its package's
        version (`plugins`), so a new version of the plug-in never reuses the old one's results.
        """
        keys = ("model", "method", "top_up", "neuroal_step", "sparsity", "pattern", "granularity", "seed",
                "calibration", "nsamples", "seqlen")
        payload = {k: getattr(self, k) for k in keys}
        payload["sparsity"] = round(self.effective_sparsity, 6)
        # knobs that change the result join the key only when set off their default, so the keys
        # of default runs (and the stores holding them) stay valid
        for k in RESULT_KNOBS:
            if getattr(self, k) != type(self).model_fields[k].default:
                payload[k] = getattr(self, k)
        plugins = self.plugins()
        if plugins:  # joins the key only for plug-ins: the keys of built-in runs stay valid
            payload["plugins"] = plugins
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def default_out(self) -> str:
        name = self.model.rstrip("/").split("/")[-1]
        method, top_up = (n.replace(":", ".") for n in (self.method, self.top_up))  # plug-in paths
        return f"runs/{name}-{method}-{top_up}-{self.effective_sparsity:g}-{self.pattern.replace(':', 'of')}"


def zeroshot_folder(path: str, field: str) -> str:
    """`path` as an absolute folder (what a spec records of --zeroshot-include); SpecError if it is none."""
    from pathlib import Path

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SpecError(field, path, "a folder of lm-eval task YAMLs")
    return str(folder.resolve())


def eval_key(kind: str, name: str, *, seqlen: int | None = None, windows: int | None = None,
             limit: int | None = None, num_fewshot: int = 0, definitions: str | None = None,
             dtype: str | None = None) -> str:
    """The identity of one evaluation (apart from the model's `cell_key`): what was measured, how,
    and in which compute dtype (`dtype`: bf16 and fp32 give different numbers; an evaluation
    recorded before the dtype was part of its identity matches no request, and is made again).

    `num_fewshot` and `definitions` (the digest of the user's task files a zero-shot task came from,
    `TaskFolder.digest`) join the hash only when set, so the keys of 0-shot stock evaluations (and the
    stores holding them) stay valid.

    >>> eval_key("perplexity", "wikitext2", seqlen=2048) == eval_key("perplexity", "wikitext2", seqlen=2048)
    True
    >>> eval_key("zeroshot", "arc_easy") == eval_key("zeroshot", "arc_easy", num_fewshot=0)
    True
    >>> eval_key("zeroshot", "arc_easy") == eval_key("zeroshot", "arc_easy", num_fewshot=2)
    False
    """
    payload = {"kind": kind, "name": name, "seqlen": seqlen, "windows": windows, "limit": limit,
               "data_version": DATA_VERSION}
    if num_fewshot:
        payload["num_fewshot"] = num_fewshot
    if definitions:
        payload["definitions"] = definitions
    if dtype:
        payload["dtype"] = dtype
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dense_key(model: str) -> str:
    """The identity of an unpruned model (`neuroal eval` on a hub id or a plain checkpoint)."""
    return hashlib.sha256(json.dumps({"model": model, "pruned": False}).encode()).hexdigest()[:16]


def first_error(exc: ValidationError) -> dict:
    """pydantic's first error; a `SpecError` raised by a validator is re-raised as it is (one line)."""
    err = exc.errors()[0]
    inner = err.get("ctx", {}).get("error")
    if isinstance(inner, SpecError):
        raise inner from None
    return err


def resolve_executor(executor: str, *, address: str | None, shards) -> str:
    """"auto": Ray when a cluster is named (--address / $RAY_ADDRESS) or the job has several shards;
    else in process. An embedded Ray instance for one shard on this machine adds its start and
    nothing else (Ray's processes 3.8 s, a shard actor's start and load 4.0 s, its shutdown 1.4 s on
    2 CPUs, `benchmarks/startup.py`): a one-off `neuroal eval` starts fast."""
    if executor != "auto":
        return executor
    many = isinstance(shards, int) and shards > 1
    return "ray" if address or many else "local"


def build_spec(**kwargs) -> PruneSpec:
    """PruneSpec from keyword flags; any validation failure becomes one SpecError line."""
    try:
        return PruneSpec(**kwargs)
    except ValidationError as exc:
        err = first_error(exc)
        field = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "spec"
        if err["type"] == "extra_forbidden":
            raise SpecError("spec", field.removeprefix("--"), "the fields of PruneSpec") from None
        if err["type"] == "literal_error":
            allowed = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
            raise SpecError(field, err.get("input"), allowed) from None
        raise SpecError(field, err.get("input"), err["msg"]) from None


__all__ = ["PruneSpec", "build_spec", "resolve_executor", "STEPS", "PATTERNS", "GRID_VERSION", "RESULT_KNOBS"]
