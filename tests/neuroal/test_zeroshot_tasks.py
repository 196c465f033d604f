"""lm-eval as its users know it (issue 24), at the `neuroal.zeroshot` level: names checked without the stock
index where they can be, the user's task folder read and copied, generation and rolling requests scored by
stock HFLM's own code."""

from __future__ import annotations

import time

import pytest
from transformers import AutoModelForCausalLM

from conftest import make_tiny_checkpoint
from neuroal import zeroshot as Z
from neuroal.errors import SpecError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    folder = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama", tokenizer=smollm2_tokenizer)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), smollm2_tokenizer


@pytest.fixture
def no_stock_index(monkeypatch):
    """Fail if anything builds lm-eval's stock task index (~10 s)."""

    def refuse():
        raise AssertionError("the stock task index was built")

    monkeypatch.setattr(Z, "_stock_task_manager", refuse)


# ----------------------------------------------------------------------------- validation


def test_the_seven_and_the_users_names_are_checked_without_the_stock_index(user_tasks, no_stock_index):
    t = time.perf_counter()
    names = Z.check_tasks(["arc_easy", "colours_mc", "colours_and_sums", "arc_easy"], user_tasks)
    assert names == ["arc_easy", "colours_mc", "colours_and_sums"]
    assert Z.check_tasks("boolq") == ["boolq"]
    assert time.perf_counter() - t < 5


def test_a_misspelt_name_of_the_users_folder_gets_close_matches(user_tasks):
    with pytest.raises(SpecError) as err:
        Z.check_tasks(["colours_mcq"], user_tasks, field="--zeroshot")
    assert err.value.field == "--zeroshot" and err.value.value == "colours_mcq"
    assert "did you mean 'colours_mc'" in str(err.value) and "\n" not in str(err.value)


def test_a_stock_name_is_found_in_the_stock_index():
    assert Z.check_tasks(["piqa", "mmlu", "gsm8k", "lambada_openai"]) == ["piqa", "mmlu", "gsm8k", "lambada_openai"]


def test_a_folder_without_tasks_is_refused(tmp_path):
    (tmp_path / "notes.yaml").write_text("just: a mapping\n")
    with pytest.raises(SpecError, match="none defines a task, group or tag"):
        Z.read_task_folder(tmp_path)
    with pytest.raises(SpecError, match="a folder of lm-eval task YAMLs"):
        Z.read_task_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------- the user's task folder


def test_task_folder_reads_names_files_and_a_digest_a_copy_keeps(user_tasks, tmp_path):
    folder = Z.read_task_folder(user_tasks)
    assert folder.names == {"colours_mc", "sums_gen", "colours_and_sums"}
    assert [rel for rel, _ in folder.files] == ["colours_and_sums.yaml", "colours_mc.yaml", "hooks.py", "sums_gen.yaml"]
    copy = Z.write_task_folder(folder, tmp_path / "copy")
    assert Z.read_task_folder(copy).digest == folder.digest  # the same definitions, wherever they are
    (copy / "hooks.py").write_text((copy / "hooks.py").read_text() + "\n# edited\n")
    assert Z.read_task_folder(copy).digest != folder.digest  # a changed hook is another evaluation


# ----------------------------------------------------------------------------- stock HFLM's own generation and rolling


def test_packed_scorer_runs_generation_and_rolling_as_stock_hflm(tiny, monkeypatch):
    """`PackedHFLM.generate_until` / `loglikelihood_rolling` are stock HFLM's (wrapped only to hide their
    progress bars); the rolling windows reach `_loglikelihood_tokens` with `override_bs`, the stock path:
    the packed rows never run for them, and every answer is stock HFLM's."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    packed_cls = Z.packed_lm_class()
    assert packed_cls._model_generate is HFLM._model_generate
    model, tok = tiny
    packed = packed_cls(pretrained=model, tokenizer=tok, batch_size=4)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    monkeypatch.setattr(packed_cls, "_score_rows", lambda *a, **k: pytest.fail("packed rows scored"))
    texts = ["The sky is blue. " * n for n in (1, 3, 7)] + ["What is 2 plus 3?"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert packed.loglikelihood_rolling(rolling, disable_tqdm=True) == stock.loglikelihood_rolling(rolling, disable_tqdm=True)
    gen = [Instance("generate_until", {}, (t, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), i)
           for i, t in enumerate(texts)]
    assert packed.generate_until(gen, disable_tqdm=True) == stock.generate_until(gen, disable_tqdm=True)


def test_groups_report_their_aggregate_and_their_members(tiny, user_tasks):
    model, tok = tiny
    rows = Z.evaluate_zeroshot(model, tok, ["colours_and_sums"], include_path=user_tasks, limit=4)
    assert [(r.task, r.metric) for r in rows][:3] == [("colours_and_sums", "acc"), ("colours_mc", "acc"),
                                                      ("colours_mc", "acc_norm")]
    assert {r.request for r in rows} == {"colours_and_sums"}
    assert {r.metric for r in rows if r.task == "sums_gen"} == {
        f"{m},{f}" for m in ("exact_match", "answer_chars") for f in ("strict-match", "flexible-extract", "whole")}
    assert all(r.n_docs == 4 for r in rows)  # the group's acc: its 4 multiple-choice documents
    assert next(r.value for r in rows if r.task == "colours_and_sums") == rows[1].value



def test_few_shot_of_an_offline_twin_is_refused_with_the_way_out(shared_data):
    """The local files of the seven hold no training split, where stock lm-eval draws the examples from."""
    from neuroal.errors import DataError

    with pytest.raises(DataError, match="train split over local files and pass --zeroshot-include DIR"):
        Z.evaluate_zeroshot(None, None, ["arc_easy"], data_dir=shared_data, num_fewshot=2)
