"""The typed record of one run: what `prune` and `evaluate` return, and what `run.json`, the results
store and the CLI summary are built from.

`run.json` is `RunRecord.to_json()`; `RunRecord.from_json` reads any run.json back (also one written
before a field existed). Read access by run.json key (`record["perplexity"]`) stays for scripts that
read run.json as a dict; new code reads the typed fields.

>>> r = RunRecord.from_json({"spec": {"model": "m", "method": "wanda", "top_up": "uniform",
...     "pattern": "unstructured"}, "cell_key": "k", "sparsity_target": 0.5, "sparsity_actual": 0.5})
>>> r.method, r.sparsity_actual, r.lambda_block, r["cell_key"]
('wanda', 0.5, None, 'k')
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the checkpoint: a perplexity or one zero-shot metric, with its protocol."""

    kind: str  # "perplexity" | "zeroshot"
    task: str  # dataset or lm-eval task
    metric: str  # "perplexity", or lm-eval's metric with its filter: "acc", "exact_match,strict-match", ...
    value: float
    stderr: float | None = None
    eval_key: str = ""  # the evaluation's identity (orchestrator.spec.eval_key)
    protocol: str = ""  # how it was made, in words: "seqlen 256, 16 of 1234 windows", "100 documents (...)"
    seqlen: int | None = None
    windows: int | None = None
    windows_available: int | None = None
    n_docs: int | None = None
    num_fewshot: int | None = None  # zero-shot: examples per prompt (lm-eval's --num_fewshot)
    request: str | None = None  # zero-shot: the task or group asked for (a group's name on its subtasks' rows)
    dtype: str | None = None  # the compute dtype it was made in (None: recorded before that was kept)

    @classmethod
    def from_entry(cls, entry: Mapping) -> Evaluation:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in names})


@dataclass(frozen=True)
class RunRecord(Mapping):
    """A pruned (or evaluated) model: chosen λs, curves, sparsity, evaluations, timings, checkpoint."""

    spec: dict  # the flags of the prune (PruneSpec as JSON)
    cell_key: str  # the pruned model's identity
    out: str | None  # the run folder (the checkpoint's location); None for a model evaluated in place
    sparsity_target: float
    sparsity_actual: float
    lambda_block: float | None = None
    lambda_row: float | None = None
    lambda_curves: dict = field(default_factory=dict)
    layer_sparsity: dict = field(default_factory=dict)
    evaluations: tuple[Evaluation, ...] = ()
    perplexity: dict = field(default_factory=dict)  # {dataset: value}, the fullest evaluation of each
    perplexity_dense: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    versions: dict = field(default_factory=dict)
    plugins: dict = field(default_factory=dict)  # {distribution: version} of a plug-in method or top-up
    data: dict = field(default_factory=dict, repr=False)  # everything run.json holds

    @classmethod
    def from_json(cls, run: Mapping) -> RunRecord:
        """The record of a run.json (a dict, or a record already)."""
        if isinstance(run, RunRecord):
            return run
        from orchestrator.results.evaluations import recorded

        data = json.loads(_dumps(dict(run)))  # JSON values only (numpy scalars and arrays become numbers, lists)
        return cls(
            spec=data["spec"], cell_key=data["cell_key"], out=data.get("out"),
            sparsity_target=float(data.get("sparsity_target", 0.0)),
            sparsity_actual=float(data.get("sparsity_actual", 0.0)),
            lambda_block=data.get("lambda_block"), lambda_row=data.get("lambda_row"),
            lambda_curves=data.get("lambda_curves") or {}, layer_sparsity=data.get("layer_sparsity") or {},
            evaluations=tuple(Evaluation.from_entry(e) for e in recorded(data)),
            perplexity=data.get("perplexity") or {}, perplexity_dense=data.get("perplexity_dense") or {},
            timings_s=data.get("timings_s") or {}, notes=tuple(data.get("notes") or ()),
            versions=data.get("versions") or {}, plugins=data.get("plugins") or {}, data=data,
        )

    def to_json(self) -> dict:
        """The run.json content: everything the run recorded, the typed fields as they are now."""
        typed = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("data", "evaluations")}
        typed["notes"] = list(self.notes)
        return {**self.data, **typed}

    @property
    def method(self) -> str:
        return self.spec["method"]

    @property
    def top_up(self) -> str:
        return self.spec["top_up"]

    @property
    def model(self) -> str:
        return self.spec["model"]

    def evaluation(self, task: str, metric: str = "perplexity") -> Evaluation:
        """The fullest evaluation of `task` on record (the one `perplexity`/`zeroshot` show)."""
        scored = [e for e in self.evaluations if e.task == task and e.metric == metric]
        if not scored:
            raise KeyError(f"no {metric} of {task!r} on record; evaluated: "
                           f"{sorted({(e.task, e.metric) for e in self.evaluations})}")
        return max(scored, key=lambda e: (e.seqlen or 0) * (e.windows or 0) + (e.n_docs or 0))

    def load_model(self, **kwargs):
        """The pruned checkpoint as a transformers model (`AutoModelForCausalLM.from_pretrained`)."""
        from transformers import AutoModelForCausalLM

        from orchestrator.results.run_folder import local_checkpoint

        if self.out is None:
            raise ValueError("this record has no run folder (a model evaluated in place): load the model itself")
        folder, cleanup = local_checkpoint(self.out)
        try:
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        finally:
            if cleanup is not None:
                cleanup.cleanup()

    # read access by run.json key, for scripts that read run.json as a dict
    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def _dumps(run: dict) -> str:
    from orchestrator.results.run_folder import to_json

    return to_json(run)
