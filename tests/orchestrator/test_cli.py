"""Bad input exits 2 with one line naming the flag and the allowed values; nothing half-written stays."""

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()


def _prune(*args, out):
    return runner.invoke(app, ["prune", "--executor", "local", "--out", str(out), *args])


def _one_line_error(result):
    text = result.output.strip()
    assert result.exit_code == 2, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", "1.5"], "--sparsity: got 1.5; allowed: a fraction strictly between 0 and 1"),
        (["--sparsity", "0"], "--sparsity"),
        (["--pattern", "4:4"], "--pattern: got '4:4'; allowed: unstructured, N:M with 0 < N < M"),
        (["--pattern", "5:4"], "--pattern"),
        (["--method", "obs"], "--method: got 'obs'; allowed: magnitude, wanda, sparsegpt, multiflow, apt, ria, d2prune"),
        (["--method", "d2prun"], "--method: got 'd2prun'; allowed: magnitude, wanda, sparsegpt, multiflow, apt, ria, "
                                 "d2prune, or package.module:object"),
        (["--method", "d2prun"], "(did you mean 'd2prune'?)"),
        (["--top-up", "owl2"], "--top-up: got 'owl2'"),
        (["--neuroal-step", "rows"], "--neuroal-step: got 'rows'; allowed: block, row, both"),
        (["--pattern", "2:4", "--top-up", "owl"], "--top-up: got 'owl'; allowed: uniform, dsnot with an N:M --pattern"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "--sparsity: got 0.7; allowed: 0.5 with --pattern 2:4"),
        (["--method", "sparsegpt", "--top-up", "neuroal", "--neuroal-step", "row"], "--neuroal-step: got 'row'"),
        (["--method", "sparsegpt", "--granularity", "layer"], "--granularity"),
        (["--method", "d2prune", "--top-up", "neuroal", "--neuroal-step", "row"],
         "--neuroal-step: got 'row'; allowed: block with --method d2prune"),
        (["--method", "d2prune", "--granularity", "layer"], "--granularity: got 'layer'; allowed: row with --method d2prune"),
        (["--eval", "wikitext3"], "--eval: got 'wikitext3'"),
        (["--nsamples", "0"], "--nsamples"),
        (["--model", "/definitely/not/here"], "model: cannot read '/definitely/not/here'"),
    ],
)
def test_bad_flags(tmp_path, args, needle):
    out = tmp_path / "run"
    line = _one_line_error(_prune(*args, out=out))
    assert needle in line
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))


def test_unsupported_architecture(tmp_path, smollm2_tokenizer):
    folder = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2)).save_pretrained(folder)
    line = _one_line_error(_prune("--model", str(folder), out=tmp_path / "run"))
    assert "architecture 'gpt2' is not supported; supported:" in line and "llama" in line


def test_unreadable_checkpoint_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    line = _one_line_error(_prune("--model", str(folder), out=tmp_path / "run"))
    assert "not a Hugging Face checkpoint folder" in line


def test_missing_data_leaves_nothing_behind(tmp_path, tiny_dirs):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "run"
    line = _one_line_error(_prune("--model", str(tiny_dirs["llama"]), "--data-dir", str(data), "--seqlen", "16",
                                  "--nsamples", "2", out=out))
    assert "c4 needs JSON-lines files" in line
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))


def test_cell_key_covers_result_knobs_and_keeps_default_keys():
    from orchestrator.spec import RESULT_KNOBS, build_spec

    # keys of default runs are those stores written before the knobs joined the key
    assert build_spec().cell_key() == "5423379a02db0db2"
    assert build_spec(method="sparsegpt", top_up="neuroal", sparsity=0.7, seqlen=256).cell_key() == "c5fa17205415fcc5"
    base = build_spec(top_up="dsnot")
    changed = {"owl_lambda": 0.1, "dsnot_same_sign": True, "dsnot_skip_mlp": False, "search_windows": 4,
               "dtype": "bfloat16", "alpha_epsilon": 0.2}
    assert set(changed) <= set(RESULT_KNOBS)
    keys = {build_spec(top_up="dsnot", **{k: v}).cell_key() for k, v in changed.items()}
    assert base.cell_key() not in keys and len(keys) == len(changed)
    # where or how fast it ran does not change the result
    assert build_spec(top_up="dsnot", shards=3, early_stop=False, max_tokens=512).cell_key() == base.cell_key()


def test_set_reaches_every_knob_without_a_flag():
    from orchestrator.cli import settable
    from orchestrator.spec import PruneSpec

    knobs = settable()
    assert {"blocksize", "percdamp", "owl_m", "owl_lambda", "alpha_epsilon", "dsnot_cycles", "dsnot_threshold",
            "dsnot_same_sign", "dsnot_skip_mlp", "search_windows", "max_tokens"} <= set(knobs)
    assert set(knobs) < set(PruneSpec.model_fields) and "sparsity" not in knobs
    result = CliRunner().invoke(app, ["prune", "--top-up", "dsnot", "--check", "--set", "dsnot_cycles=7",
                                      "--set", "dsnot-threshold=0.25", "--set", "dsnot_same_sign=true",
                                      "--set", "max_tokens=512"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.output)
    assert (spec["dsnot_cycles"], spec["dsnot_threshold"], spec["dsnot_same_sign"], spec["max_tokens"]) == (
        7, 0.25, True, 512)
