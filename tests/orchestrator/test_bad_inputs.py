"""Every bad input across the five commands: one `error:` line naming the field, exit 2, nothing
written, within seconds (issue 23). Each case is a command line and the text its one line must hold."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app

MARKER = "PLANTED-PICKLE-RAN"


class _Planted:
    """A pickle that, if ever loaded, leaves a marker file (what an attacker's file would run)."""

    def __init__(self, folder: Path):
        self.path = str(folder / MARKER)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_dirs) -> dict[str, str]:
    """Broken inputs, made once: token files, checkpoints, grids, folders that are not what they claim."""
    root = tmp_path_factory.mktemp("bad")
    model = tiny_dirs["llama"]
    f = {"model": str(model), "root": str(root)}
    with open(root / "planted.pt", "wb") as fh:
        pickle.dump(_Planted(root), fh)
    f["planted"] = str(root / "planted.pt")
    torch.save(torch.randint(0, 60000, (4, 32)), root / "ids_oob.pt")  # the vocabulary is 49152
    np.save(root / "ids_neg.npy", -np.ones((4, 32), dtype=np.int64))
    torch.save(torch.rand(4, 32), root / "ids_float.pt")
    np.save(root / "ids_3d.npy", np.zeros((2, 4, 32), dtype=np.int64))
    np.save(root / "ids_object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save(torch.zeros(2, 16, dtype=torch.long), root / "ids_short.pt")
    (root / "ids_garbage.pt").write_bytes(b"\x00not a torch file at all")
    for name in ("truncated", "lacking", "badindex", "noweights"):
        shutil.copytree(model, root / name)
    with open(root / "truncated" / "model.safetensors", "r+b") as fh:
        fh.truncate(5000)
    from safetensors.torch import load_file, save_file

    state = load_file(model / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, root / "lacking" / "model.safetensors", metadata={"format": "pt"})
    (root / "badindex" / "model.safetensors.index.json").write_text("{not json")
    (root / "noweights" / "model.safetensors").unlink()
    (root / "userfolder").mkdir()
    (root / "userfolder" / "thesis.tex").write_text("years of work")
    (root / "afile").write_text("a user's file")
    (root / "emptystore").mkdir()
    (root / "grid_badyaml.yaml").write_text("name: x\nmodels: [a\n")
    (root / "grid_typo.yaml").write_text("name: x\nmodels: [m]\nmethdo: [wanda]\n")
    (root / "grid_method.yaml").write_text(f"name: x\nmodels: ['{model}']\nmethods: [obs]\nsparsities: [0.5]\n")
    (root / "grid_sparsity.yaml").write_text(f"name: x\nmodels: ['{model}']\nsparsities: [1.5]\n")
    (root / "grid_list.yaml").write_text("- just\n- a list\n")
    (root / "grid_plugin.yaml").write_text(f"name: x\nmodels: ['{model}']\nmethods: [neuroal.scores:magnitude]\n"
                                           "top_ups: [nopkg_xyz.allocators:Ramp]\n")
    return f


P = ["prune", "--executor", "local", "--seqlen", "32", "--nsamples", "4", "--model", "{model}"]
E = ["eval", "--executor", "local", "--model", "{model}", "--seqlen", "32"]

CASES = [
    # prune: flags
    (P + ["--sparsity", "1.5"], "--sparsity: got 1.5; allowed: a fraction strictly between 0 and 1"),
    (P + ["--sparsity", "nan"], "--sparsity: got nan"),
    (P + ["--method", "obs"], "--method: got 'obs'; allowed: magnitude, wanda"),
    (P + ["--top-up", "owl2"], "--top-up: got 'owl2'"),
    # prune: --set key=value reaches the knobs without a flag of their own
    (P + ["--set", "blocksize"], "--set: got 'blocksize'; allowed: key=value with key one of blocksize, percdamp"),
    (P + ["--set", "blocksiz=64"], "(did you mean 'blocksize'?)"),
    (P + ["--set", "blocksize=many"], "--set blocksize: got 'many'"),
    (P + ["--set", "search_windows=0"], "--set search_windows: got '0'; allowed: a positive integer"),
    (P + ["--set", "sparsity=0.3"], "knobs without a flag of their own (use --sparsity)"),
    # prune: a plug-in named package.module:object (neuroal.plugins)
    (P + ["--method", "nopkg_xyz.methods:cubic"], "--method: got 'nopkg_xyz.methods:cubic'; allowed: magnitude, wanda"),
    (P + ["--method", "nopkg_xyz.methods:cubic"], "or package.module:object naming a Method or a score function (W, "
                                                  "stats) -> scores (cannot import 'nopkg_xyz.methods': "
                                                  "ModuleNotFoundError: No module named 'nopkg_xyz')"),
    (P + ["--method", "neuroal.scores:wandaa"], "('neuroal.scores' has no attribute 'wandaa'; did you mean 'wanda'?)"),
    (P + ["--method", "neuroal.scores.wanda"], "(did you mean 'neuroal.scores:wanda'?)"),
    (P + ["--method", "neuroal.scores:"], "--method: got 'neuroal.scores:'; allowed: magnitude"),
    (P + ["--method", "neuroal.methods:METHODS"], "(it is a Registry; expected a neuroal.methods.Method or a score"),
    (P + ["--top-up", "nopkg_xyz:Ramp"], "--top-up: got 'nopkg_xyz:Ramp'; allowed: alpha, neuroal, owl, uniform, "
                                         "dsnot, or package.module:object naming an Allocator subclass or instance "
                                         "(cannot import 'nopkg_xyz'"),
    (P + ["--top-up", "neuroal.allocation:Allocator"], "(it is class Allocator; expected a subclass of "
                                                       "neuroal.allocation.Allocator or an instance of one)"),
    (P + ["--top-up", "neuroal.scores:wanda"], "--top-up: got 'neuroal.scores:wanda'; allowed: alpha"),
    (P + ["--top-up", "neuroal.scores:wanda"], "(it is a function; expected a subclass of neuroal.allocation.Allocator"),
    (P + ["--pattern", "2:4", "--top-up", "neuroal.allocation.owl:OWL"],
     "--top-up: got 'neuroal.allocation.owl:OWL'; allowed: uniform, dsnot with an N:M --pattern"),
    (P + ["--pattern", "4:4"], "--pattern: got '4:4'"),
    (P + ["--pattern", "2:4", "--top-up", "neuroal"], "--top-up: got 'neuroal'; allowed: uniform, dsnot"),
    (P + ["--eval", "wikitext3"], "--eval: got 'wikitext3'; allowed: wikitext2, c4, ptb, a .txt/.jsonl/.parquet file "
                                  "(did you mean 'wikitext2'?)"),
    (P + ["--eval", "wikitext2", "--eval-windows", "0"], "--eval-windows: got 0; allowed: a positive integer"),
    (P + ["--eval", "wikitext2", "--eval-windows", "-3"], "--eval-windows: got -3"),
    (P + ["--zeroshot", "arc_easy", "--zeroshot-limit", "0"], "--zeroshot-limit: got 0; allowed: a positive integer"),
    (P + ["--zeroshot", "piqaa"], "--zeroshot: got 'piqaa'; allowed: a task, group or tag of lm-eval"),
    (P + ["--zeroshot", "arc_easy", "--num-fewshot", "-2"], "--num-fewshot: got -2; allowed: a non-negative integer"),
    (P + ["--zeroshot", "arc_easy", "--zeroshot-include", "{root}/afile"], "--zeroshot-include: got '{root}/afile'"),
    (P + ["--shards", "0"], "--shards: got 0"),
    (P + ["--shards", "99"], "--shards: got 99; allowed: 1..3 (the model has 3 blocks)"),
    (P + ["--gpu-mem", "banana"], "--gpu-mem: got 'banana'; allowed: a positive size"),
    (P + ["--dtype", "float8"], "--dtype: got 'float8'; allowed: auto, float32, bfloat16, float16"),
    (P + ["--device", "tpu"], "--device: got 'tpu'"),
    (P + ["--executor", "dask"], "--executor: got 'dask'; allowed: ray, local"),
    (P + ["--offload", "gpu"], "--offload: got 'gpu'; allowed: auto, none, cpu, disk"),
    (P + ["--neuroal-tie-rule", "coin"], "--neuroal-tie-rule: got 'coin'"),
    (P + ["--seqlen", "100000"], "--seqlen: got 100000; allowed: at most 2048 (the model's max_position_embeddings)"),
    (P + ["--nsamples", "100000", "--seqlen", "2048"], "--nsamples: got 100000; allowed: at most"),
    (P + ["--data-dir", "{root}/nowhere"], "data-dir: '{root}/nowhere' is not a folder"),
    # prune: files handed in
    (P + ["--calibration", "{root}/planted.pt"], "it holds pickled objects that are not tensors, which are never loaded"),
    (P + ["--calibration", "{root}/ids_oob.pt"], "allowed: 0..49151 (the tokenizer's vocabulary of 49152)"),
    (P + ["--calibration", "{root}/ids_neg.npy"], "holds token ids from -1 to -1; allowed: 0..49151"),
    (P + ["--calibration", "{root}/ids_float.pt"], "holds a 2-d float32 tensor; allowed: integer token ids of shape [n, seqlen]"),
    (P + ["--calibration", "{root}/ids_3d.npy"], "holds a 3-d int64 tensor; allowed: integer token ids"),
    (P + ["--calibration", "{root}/ids_object.npy"], "is not a readable file of token ids (ValueError"),
    (P + ["--calibration", "{root}/ids_short.pt"], "holds token ids of shape (2, 16); need at least [--nsamples 4, --seqlen 32]"),
    (P + ["--calibration", "{root}/ids_garbage.pt"], "is not a readable file of token ids"),
    (P + ["--calibration", "{root}/missing.pt"], "calibration: file '{root}/missing.pt' does not exist"),
    (P + ["--calibration", "{root}/userfolder"], "is a folder, not a file"),
    (P + ["--model", "{root}/truncated"], "model.safetensors is truncated (5000 bytes"),
    (P + ["--model", "{root}/lacking"], "lacks 1 of the"),
    (P + ["--model", "{root}/badindex"], "model.safetensors.index.json is not a readable safetensors index"),
    (P + ["--model", "{root}/noweights"], "has a config.json but no *.safetensors or *.bin weights"),
    (P + ["--model", "/definitely/not/here"], "model: cannot read '/definitely/not/here'"),
    # prune: where results go
    (P + ["--out", "{root}/afile"], "--out: {root}/afile is a file; allowed: a folder"),
    (P + ["--out", "{root}/userfolder"], "--out: {root}/userfolder holds 1 file(s) that are not a neuroal run (thesis.tex)"),
    (P + ["--out", "{root}/userfolder", "--overwrite"], "that are not a neuroal run"),
    (P + ["--out", "/proc/neuroal-run"], "--out: cannot create /proc/neuroal-run"),
    (P + ["--store", "{root}/afile"], "--store: {root}/afile is a file; allowed: a folder"),
    # eval
    (E + ["--eval", "wikitext2", "--eval-windows", "0"], "--eval-windows: got 0"),
    (E + ["--eval", "wikitext2", "--seqlen", "0"], "--seqlen: got 0; allowed: a positive integer"),
    (E + ["--eval", "wikitext2", "--seqlen", "100000"], "--seqlen: got 100000; allowed: at most 2048"),
    (E, "--eval/--zeroshot: nothing to evaluate"),
    (E + ["--zeroshot", "nope"], "--zeroshot: got 'nope'"),
    (E + ["--zeroshot", "arc_easy", "--zeroshot-limit", "-1"], "--zeroshot-limit: got -1"),
    (E + ["--eval", "wikitext2", "--model", "{root}/truncated"], "model.safetensors is truncated"),
    (E + ["--eval", "wikitext2", "--store", "{root}/afile"], "--store: {root}/afile is a file"),
    # grid
    (["grid", "{root}/missing.yaml", "--check"], "grid: got '{root}/missing.yaml'; allowed: a readable YAML file"),
    (["grid", "{root}/grid_badyaml.yaml", "--check"], "allowed: valid YAML"),
    (["grid", "{root}/grid_list.yaml", "--check"], "allowed: a YAML mapping of grid keys"),
    (["grid", "{root}/grid_typo.yaml", "--check"], "grid key 'methdo': got 'unknown'; allowed: "),
    (["grid", "{root}/grid_typo.yaml", "--check"], "(did you mean 'methods'?)"),
    (["grid", "{root}/grid_method.yaml", "--check"], "got 'obs'; allowed: magnitude, wanda"),
    (["grid", "{root}/grid_sparsity.yaml", "--check"], "got 1.5"),
    (["grid", "{root}/grid_plugin.yaml", "--check"], "--top-up: got 'nopkg_xyz.allocators:Ramp'"),
    (["grid", "{root}/grid_method.yaml", "--store", "{root}/afile"], "--store: {root}/afile is a file"),
    # plan
    (["plan", "--model", "{model}", "--gpu-mem", "80XB"], "--gpu-mem: got '80XB'"),
    (["plan", "--model", "{model}", "--gpus", "0"], "--gpus: got 0; allowed: a positive integer"),
    (["plan", "--model", "{model}", "--streams", "0"], "--streams: got 0; allowed: a positive integer"),
    (["plan", "--model", "{model}", "--dtype", "int4"], "--dtype: got 'int4'"),
    (["plan", "--model", "{model}", "--sparsity", "2"], "--sparsity: got 2.0"),
    (["plan", "--model", "{model}", "--offload", "gpu"], "--offload: got 'gpu'"),
    (["plan", "--model", "/nope"], "model: cannot read the config of '/nope'"),
    (["plan", "--model", "{model}", "--method", "neuroal.scores:magnitud"], "did you mean 'magnitude'?"),
    # report
    (["report", "{root}/nope"], "store: '{root}/nope' is not a folder"),
    (["report", "{root}/afile"], "store: '{root}/afile' is not a folder"),
    (["report", "{root}/emptystore"], "holds no results"),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a[a.index("{model}") + 1:] if "{model}" in a else a)[:60]
                                                  for a, _ in CASES])
def test_a_bad_input_is_one_line_exit_2_and_nothing_written(args, needle, bad, tmp_path, monkeypatch):
    assert len(CASES) >= 30
    monkeypatch.chdir(tmp_path)  # default --out (runs/...) and report folders land here
    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    argv = [a.format(**bad) for a in args]
    if argv[0] == "prune" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    before_bad, before_here = _tree(Path(bad["root"])), _tree(tmp_path)
    t = time.perf_counter()
    result = CliRunner().invoke(app, argv)
    seconds = time.perf_counter() - t
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and needle.format(**bad) in lines[0], lines[0]
    assert _tree(tmp_path) == before_here and _tree(Path(bad["root"])) == before_bad  # nothing written
    assert not (Path(bad["root"]) / MARKER).exists()
    assert seconds < 30


def test_a_planted_pickle_in_a_resume_folder_is_never_loaded(tiny_dirs, shared_data, tmp_path, monkeypatch, caplog):
    """An interrupted run's resume folder (which may be a shared s3:// prefix) holding a planted
    `allocation.pt`, a damaged `allocation.json` and a damaged shard checkpoint: the rerun loads none
    of them, says so, and chooses the λ a clean run chooses."""
    from orchestrator.results.run_folder import RunOutput
    from orchestrator.pruning.job import prune
    from orchestrator.spec import build_spec

    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    kw = dict(model=str(tiny_dirs["llama"]), top_up="neuroal", sparsity=0.6, seqlen=32, nsamples=8, executor="local",
              data_dir=str(shared_data))
    clean = prune(build_spec(out=str(tmp_path / "clean"), **kw))
    spec = build_spec(out=str(tmp_path / "run"), **kw)
    resume = Path(RunOutput(spec.out, spec.cell_key()).resume_location)
    resume.mkdir()
    with open(resume / "allocation.pt", "wb") as fh:
        pickle.dump(_Planted(tmp_path), fh)
    (resume / "allocation.json").write_text('{"format": "neuroal-allocation/1", "cell_key": "')  # cut short
    (resume / "shard-0000-0003.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with caplog.at_level("WARNING"):
        run = prune(spec)
    assert not (tmp_path / MARKER).exists()
    assert (run["lambda_block"], run["lambda_row"]) == (clean["lambda_block"], clean["lambda_row"])
    assert not any("restored" in n for n in run["notes"])
    text = caplog.text
    assert "allocation.pt (a pickle, never loaded)" in text and "ignoring allocation.json" in text
    assert "ignoring" in text and "shard-0000-0003.safetensors (unreadable" in text
    assert not resume.exists()  # a finished run drops its resume folder


def test_a_quick_eval_never_replaces_the_full_one_in_run_json(tiny_dirs, shared_data, tmp_path, monkeypatch):
    from orchestrator.pruning.job import prune
    from orchestrator.spec import build_spec
    from orchestrator.results.store import read_store

    monkeypatch.setenv("NEUROAL_STORE", str(tmp_path / "store"))
    out = tmp_path / "run"
    full = prune(build_spec(model=str(tiny_dirs["llama"]), seqlen=32, nsamples=4, executor="local", eval="wikitext2",
                            eval_windows=6, data_dir=str(shared_data), out=str(out)))
    runner = CliRunner()

    def quick(windows: int) -> dict:
        result = runner.invoke(app, ["eval", "--model", str(out), "--eval", "wikitext2", "--eval-windows", str(windows),
                                     "--executor", "local", "--data-dir", str(shared_data)])
        assert result.exit_code == 0, result.output
        assert f"seqlen 32, {windows} of" in result.output  # the summary shows each evaluation's protocol
        return json.loads((out / "run.json").read_text())

    after = quick(2)
    assert after["perplexity"] == full["perplexity"] and after["eval_data"] == full["eval_data"]
    assert sorted(e["windows"] for e in after["evaluations"]) == [2, 6]
    assert len({e["eval_key"] for e in after["evaluations"]}) == 2
    fuller = quick(8)  # a fuller one becomes the headline; both earlier ones stay on record
    assert fuller["eval_data"]["wikitext2"]["windows"] == 8
    assert fuller["perplexity"]["wikitext2"] == next(e["value"] for e in fuller["evaluations"] if e["windows"] == 8)
    assert sorted(e["windows"] for e in fuller["evaluations"]) == [2, 6, 8]
    rows = [r for r in read_store(tmp_path / "store").table.to_pylist() if r["metric"] == "perplexity"]
    assert sorted(r["protocol"] for r in rows) == [f"seqlen 32, {n} of 9530 windows, float32" for n in (2, 6, 8)]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip().startswith("neuroal 0.")


def test_allocation_resume_file_round_trips_exactly():
    from neuroal.allocation import Allocation
    from orchestrator.pruning.resume import allocation_json, parse_allocation

    rows = np.random.default_rng(0).uniform(0.01, 0.99, 37)
    alloc = Allocation({0: {"q": 0.5, "down": rows}, 1: {"q": 0.30000000000000004, "down": rows.astype(np.float32)}},
                       lambda_block=0.15, lambda_row=0.08, curves={"block": [{"lambda": 0.01, "score": 1e-3}]},
                       notes=["a"], step_run="both", extra={"tie_check": {"block": {"margin": np.float64(2.5)}}})
    back = parse_allocation(allocation_json(alloc, "k"), "k", 2, ["q", "down"])
    assert back.ratios[1]["q"] == alloc.ratios[1]["q"]
    for b in (0, 1):
        assert back.ratios[b]["down"].dtype == alloc.ratios[b]["down"].dtype
        assert np.array_equal(back.ratios[b]["down"], alloc.ratios[b]["down"])
    assert (back.lambda_block, back.lambda_row, back.curves, back.step_run) == (0.15, 0.08, alloc.curves, "both")
    assert back.extra == {"tie_check": {"block": {"margin": 2.5}}}
    for key, n_blocks, linears in (("other", 2, ["q", "down"]), ("k", 3, ["q", "down"]), ("k", 2, ["q"])):
        with pytest.raises(ValueError):
            parse_allocation(allocation_json(alloc, "k"), key, n_blocks, linears)
    with pytest.raises(ValueError):  # an object array is never built from the file
        parse_allocation(allocation_json(alloc, "k").replace('"float64"', '"object"'), "k", 2, ["q", "down"])
