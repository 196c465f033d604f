"""Zero-shot evaluation through lm-eval: offline task twins, prompt equivalence with the stock tasks,
scoring a tiny random model, errors; one slow test with the real SmolLM2-135M."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import inspect
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

from neuroal.errors import DataError, SpecError
from neuroal.zeroshot import (
    OFFLINE_TASK_NAMES,
    TASKS,
    TASKS_DIR,
    ZeroShotResult,
    _offline_dir,
    count_docs,
    evaluate_zeroshot,
)

DATA_DIR = Path(os.environ.get("NEUROAL_DATA_DIR", "/work/shared/data"))
ZS = DATA_DIR / "zeroshot"

pytestmark = pytest.mark.skipif(not ZS.is_dir(), reason=f"no zero-shot data under {DATA_DIR}")

SPLIT_SIZES = {
    "rte": 277,
    "winogrande": 1267,
    "boolq": 3270,
    "hellaswag": 10042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}
HAS_ACC_NORM = {"hellaswag", "arc_easy", "arc_challenge", "openbookqa"}


def _stock_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


STOCK_YAML = {
    "rte": "glue/rte/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


# ----------------------------------------------------------------------------- document counts


@pytest.mark.parametrize("task", TASKS)
def test_offline_task_loads_full_split(task):
    assert count_docs(task, DATA_DIR) == SPLIT_SIZES[task]


def test_zeroshot_folder_itself_is_accepted():
    assert count_docs("rte", ZS) == 277


# ----------------------------------------------------------------------------- same config as stock


def test_stock_rte_is_glue_rte():
    """lm-eval 0.4.13's `rte` is GLUE RTE (the SuperGLUE copy is `sglue_rte`): the twin follows it."""
    declaring = [
        p.relative_to(_stock_dir()).as_posix()
        for p in _stock_dir().rglob("*.yaml")
        if re.search(r"(?m)^task:\s*rte\s*$", p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert declaring == ["glue/rte/default.yaml"]


_PROMPT_KEYS = (
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "target_delimiter",
    "fewshot_delimiter",
    "description",
    "should_decontaminate",
    "doc_to_decontamination_query",
    "metric_list",
    "num_fewshot",
)


def _norm(value):
    return inspect.getsource(value) if callable(value) else value


@pytest.mark.parametrize("task", TASKS)
def test_offline_yaml_keeps_stock_prompt_and_metrics(task):
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = load_yaml(_stock_dir() / STOCK_YAML[task], resolve_func=True)
    local = load_yaml(TASKS_DIR / f"{OFFLINE_TASK_NAMES[task]}.yaml", resolve_func=True)
    assert local["task"] == OFFLINE_TASK_NAMES[task] != stock["task"] == task
    for key in _PROMPT_KEYS:
        assert _norm(local.get(key)) == _norm(stock.get(key)), key
    assert local["metadata"]["version"] == stock["metadata"]["version"]
    assert callable(local["custom_dataset"]) and "dataset_path" not in local


# ----------------------------------------------------------------------------- prompt equivalence

# first validation items of the official HellaSwag `hellaswag_val.jsonl` (rowanz/hellaswag), in the
# stock HF schema, as the stock task reads them (fields not used by the prompt left out)
HELLASWAG_HEAD = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he", "3",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."]),
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady", "3",
     ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
      "stands and lifts the weight over her head."]),
    ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in "
     "the water, with other individuals visible in the background.", "the child and a different man", "2",
     ["are then shown paddling down a river in a boat while a woman talks.",
      "are driving the canoe, they go down the river flowing side to side.",
      "sit in a canoe while the man paddles.",
      "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."]),
    ("High jump", "A boy is running down a track.", "the boy", "2",
     ["runs into a car.", "gets in a mat.", "lifts his body above the height of a pole.",
      "stands on his hands and springs."]),
    ("High jump", "The boy lifts his body above the height of a pole. The boy lands on his back on to a red mat.",
     "the boy", "1",
     ["turns his body around on the mat.", "gets up from the mat.", "continues to lift his body over the pole.",
      "wiggles out of the mat."]),
    ("High jump", "The boy lands on his back on to a red mat. The boy gets up from the mat.", "the boy", "1",
     ["starts doing spins.", "celebrates by clapping and flexing both arms.", "is dancing on the mat.",
      "does jump jacks on his stick."]),
    ("Playing harmonica", "A man is standing in front of a camera. He starts playing a harmonica for the camera.",
     "he", "2",
     ["begins to play the harmonica with his body while looking at the camera.",
      "seems to be singing while playing the harmonica.", "rocks back and forth to the music as he goes.",
      "painted a fence in front of the camera."]),
    ("Sumo", "A cartoon animation video is shown with people wandering around and rockets being shot.", "two men",
     "0",
     ["fight robots of evil and ends with a to be continued.", "are then shown in closeups shooting a shot put.",
      "push a child in a speedboat in the water.", "look in the cameraman's eye and smile."]),
    ("Sharpening knives", "A man is holding a pocket knife while sitting on some rocks in the wilderness.",
     "then he", "1",
     ["opens a can of oil put oil on the knife, and puts oil on a knife and press it through a can filled with "
      "oil then cuts several pieces from the sandwiches.",
      "takes a small stone from the flowing river and smashes it on another stone.",
      "uses the knife to shave his leg.", "sand the rocks and tops them by using strong pressure."]),
]


def _jsonl(path: Path, n: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def _stock_docs(task: str, n: int) -> list[dict]:
    """The first `n` items of the local file, rewritten by hand into the stock HF dataset schema."""
    if task == "arc_easy":
        recs = _jsonl(ZS / "arc_easy/test.jsonl", n)
        return [
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]],
                },
                "answerKey": r["answerKey"],
            }
            for r in recs
        ]
    if task == "boolq":
        return [
            {"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": ["false", "true"].index(r["label"])}
            for r in _jsonl(ZS / "boolq/superglue_val.jsonl", n)
        ]
    if task == "rte":
        return [
            {
                "sentence1": r["premise"],
                "sentence2": r["hypothesis"],
                "label": ["entailment", "not_entailment"].index(r["label"]),
                "idx": r["idx"],
            }
            for r in _jsonl(ZS / "rte/val.jsonl", n)
        ]
    if task == "winogrande":
        return [
            {k: r[k] for k in ("sentence", "option1", "option2", "answer")}
            for r in _jsonl(ZS / "winogrande/dev.jsonl", n)
        ]
    if task == "openbookqa":
        with open(ZS / "openbookqa/test.tsv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
        docs = []
        for r in rows:
            parts = re.split(r"\s*\(([A-D])\)\s", " " + r["Choices"])[1:]
            docs.append(
                {
                    "id": r["ID"],
                    "question_stem": r["Question Stem"],
                    "choices": {"text": parts[1::2], "label": parts[0::2]},
                    "answerKey": r["Answer Key"],
                }
            )
        return docs
    if task == "hellaswag":
        return [
            {"activity_label": a, "ctx_a": ca, "ctx_b": cb, "ctx": f"{ca} {cb}", "label": lab, "endings": e}
            for a, ca, cb, lab, e in HELLASWAG_HEAD[:n]
        ]
    raise AssertionError(task)


def _stock_task(task: str, docs: list[dict]):
    """The stock lm-eval task (stock YAML, stock hooks) fed `docs` instead of the hub dataset."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(_stock_dir() / STOCK_YAML[task], resolve_func=True)
    splits = [cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)]
    for key in ("dataset_path", "dataset_name", "dataset_kwargs", "include"):
        cfg.pop(key, None)
    cfg["custom_dataset"] = lambda **_: {s: datasets.Dataset.from_list(docs) for s in splits}
    cfg["num_fewshot"] = 0
    return ConfigurableTask(config=cfg)


def _offline_task(task: str):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(DATA_DIR)})
    name = OFFLINE_TASK_NAMES[task]
    t = tm.load([name])["tasks"][name]
    t.set_config(key="num_fewshot", value=0)
    return t


def _rendered(t, n: int):
    t.build_all_requests(limit=n, rank=0, world_size=1)
    docs = list(t.eval_docs)[:n]
    requests = sorted((i.doc_id, i.idx, i.args) for i in t.instances)
    targets = [t.doc_to_target(d) for d in docs]
    return requests, targets


@pytest.mark.parametrize(
    "task,n",
    [("arc_easy", 20), ("boolq", 20), ("winogrande", 20), ("openbookqa", 20), ("rte", 20),
     ("hellaswag", len(HELLASWAG_HEAD))],
)
def test_offline_prompts_equal_stock_prompts(task, n):
    """(context, continuation) of every request and every target match what the stock task builds."""
    stock_req, stock_tgt = _rendered(_stock_task(task, _stock_docs(task, n)), n)
    local_req, local_tgt = _rendered(_offline_task(task), n)
    assert len(local_req) >= 2 * n
    assert local_req == stock_req
    assert local_tgt == stock_tgt


def test_hellaswag_ctx_b_capital_restored():
    from neuroal.tasks.hellaswag import restore_ctx_b_capital as fix

    assert fix("Sharpening knives: A man sits on rocks. then he") == "Sharpening knives: A man sits on rocks. Then he"
    assert fix("Sumo: two men") == "Sumo: Two men"
    wikihow = "Health: How to manage grass allergies. Use allergy medication. Try it, Bob."
    assert fix(wikihow) == wikihow


def test_arc_challenge_has_the_two_rebuilt_questions():
    docs = list(_offline_task("arc_challenge").eval_docs)
    assert len(docs) == 1172
    key = [r["id"] for r in _jsonl(ZS / "arc_challenge/test-answer-key.jsonl")]
    assert [d["id"] for d in docs] == key
    for pos, qid in ((59, "Mercury_412681"), (88, "MCAS_2006_9_43")):
        assert docs[pos]["id"] == qid and docs[pos]["answerKey"] == "C"
        assert not docs[pos]["question"].startswith("Question:") and len(docs[pos]["choices"]["text"]) == 4


# ----------------------------------------------------------------------------- scoring a tiny model


@pytest.fixture(scope="module")
def tiny_results():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuroal.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=37,
    )
    model = LlamaForCausalLM(cfg)
    return evaluate_zeroshot(model, tok, TASKS, data_dir=DATA_DIR, limit=8, batch_size=8)


@pytest.fixture(scope="module")
def tiny_stock_results(tiny_results):
    """The same model and documents through stock lm-eval `HFLM` at its default batch size (1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuroal.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=37)
    return evaluate_zeroshot(LlamaForCausalLM(cfg), tok, TASKS, data_dir=DATA_DIR, limit=8, batch_size=1,
                             packed=False)


@pytest.mark.parametrize("task", TASKS)
def test_tiny_model_scores_every_task(tiny_results, tiny_stock_results, task):
    rows = {r.metric: r for r in tiny_results if r.task == task}
    assert set(rows) == ({"acc", "acc_norm"} if task in HAS_ACC_NORM else {"acc"})
    stock = {r.metric: r for r in tiny_stock_results if r.task == task}
    for r in rows.values():
        assert isinstance(r, ZeroShotResult)
        assert r.value == stock[r.metric].value  # the accuracy stock lm-eval HFLM computes on these documents
        assert math.isfinite(r.stderr) and 0.0 <= r.stderr <= 0.5
        assert r.n_docs == 8


def test_results_follow_task_order(tiny_results):
    assert [r.task for r in tiny_results if r.metric == "acc"] == list(TASKS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_results[0].value = 1.0


# ----------------------------------------------------------------------------- errors and resolution


def test_unknown_task_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        evaluate_zeroshot(None, None, ["arc_easy", "arc_eazy"], data_dir=DATA_DIR)
    assert err.value.field == "tasks" and err.value.value == "arc_eazy"
    assert "did you mean 'arc_easy'" in err.value.allowed  # the closest names lm-eval knows
    with pytest.raises(SpecError):
        count_docs("mmlu", DATA_DIR)
    with pytest.raises(SpecError):
        evaluate_zeroshot(None, None, [], data_dir=DATA_DIR)


def test_missing_file_is_a_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "rte" / "val.jsonl"))):
        evaluate_zeroshot(None, None, ["rte"], data_dir=tmp_path)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "openbookqa" / "test.tsv"))):
        count_docs("openbookqa", tmp_path)


def test_missing_arc_challenge_supplement_is_a_data_error(tmp_path):
    folder = tmp_path / "zeroshot" / "arc_challenge"
    folder.mkdir(parents=True)
    for name in ("test.jsonl", "test-answer-key.jsonl"):
        shutil.copy(ZS / "arc_challenge" / name, folder / name)
    with pytest.raises(DataError, match=re.escape(str(folder / "test-missing2-llm-foundry.jsonl"))):
        count_docs("arc_challenge", tmp_path)


def test_env_data_dir_used_only_when_it_holds_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_DATA_DIR", str(DATA_DIR))
    assert _offline_dir(["rte", "boolq"], None) == DATA_DIR
    assert count_docs("rte") == 277
    monkeypatch.setenv("NEUROAL_DATA_DIR", str(tmp_path))
    assert _offline_dir(["rte"], None) is None  # -> stock tasks
    monkeypatch.delenv("NEUROAL_DATA_DIR")
    assert _offline_dir(["rte"], None) is None
    assert _offline_dir(["rte"], DATA_DIR) == DATA_DIR  # explicit folder wins


def test_hellaswag_uncompressed_copy_is_accepted(tmp_path):
    folder = tmp_path / "hellaswag"
    folder.mkdir()
    with gzip.open(ZS / "hellaswag/hellaswag_val_full.txt.gz", "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    (folder / "hellaswag_val_full.txt").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    assert count_docs("hellaswag", tmp_path) == 2


# ----------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_smollm2_arc_easy_and_boolq():
    from neuroal.models import load_full, load_tokenizer, resolve_model

    folder = resolve_model("smollm2-135m")
    model, _ = load_full(folder)
    tok = load_tokenizer(folder)
    # 50 documents per task (it was 100: twice the time through the same code paths)
    results = evaluate_zeroshot(model, tok, ["arc_easy", "boolq"], data_dir=DATA_DIR, limit=50)
    for r in results:
        print(f"SmolLM2-135M {r.task} {r.metric} = {r.value:.3f} ± {r.stderr:.3f} (n={r.n_docs})")
    got = {(r.task, r.metric): r.value for r in results}
    assert set(got) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("boolq", "acc")}
    assert all(r.n_docs == 50 for r in results)
    assert got[("arc_easy", "acc")] > 0.35  # chance is ~0.25 (3-5 choices)
    # BoolQ is near chance for a 135M model (the embedded one is a Q4_1 instruct GGUF); both accuracies
    # equal what stock lm-eval HFLM (unmodified, batch size 1) computes on the same documents
    stock = evaluate_zeroshot(model, tok, ["arc_easy", "boolq"], data_dir=DATA_DIR, limit=50, batch_size=1,
                              packed=False)
    assert {(r.task, r.metric): r.value for r in stock} == got
