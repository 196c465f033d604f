"""Shared fixtures: tiny random models per family (transformers' tester sizes) and real data paths."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHARED_DATA = Path(os.environ.get("NEUROAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

VOCAB = 49152  # the SmolLM2 tokenizer's, so tiny models run on real text

TINY = {
    "llama": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=40),  # divisible by 8: N:M patterns apply
    "llama_gqa": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=37),
    "mistral": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=37),
    "qwen2": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=37),
    "qwen3": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=37, head_dim=8),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=37,
                word_embed_proj_dim=32, max_position_embeddings=128),
    "phi": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37),
    "mamba": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=4, expand=2, conv_kernel=4,
                  time_step_rank=8),
    "mamba2": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4,
                   num_heads=8, head_dim=8, n_groups=1, chunk_size=16),
    # dense architectures users bring (issue 13); sliding windows of 8 < test seqlens so the masks matter
    "llama3": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=40, tie_word_embeddings=True, rope_theta=500000.0,
                   max_position_embeddings=256,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)),
    "gemma2": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=8, intermediate_size=40, sliding_window=8, query_pre_attn_scalar=8),
    "gemma3_text": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=40, sliding_window=8,
                        query_pre_attn_scalar=8, final_logit_softcapping=3.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phi3": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=40, pad_token_id=0,  # Phi-4-mini-like: GQA, partial rotary, longrope
                 partial_rotary_factor=0.5, max_position_embeddings=64, original_max_position_embeddings=16,
                 rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.0], long_factor=[2.0, 4.0])),
    "phi3_mha": dict(model_type="phi3", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=40, pad_token_id=0),  # fused qkv fits the row step
    "olmo2": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=40, pad_token_id=0, eos_token_id=0),
    # mixture of experts (issue 13): 4 experts, top-2, fused [E, out, in] expert parameters (written
    # per expert by save_pretrained, as hub checkpoints are)
    "mixtral": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=40, moe_intermediate_size=40,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
}


def tiny_config(name: str, **overrides):
    kw = dict(TINY[name], **overrides)
    model_type = kw.pop("model_type", name)
    return AutoConfig.for_model(model_type, **kw)


def make_tiny_checkpoint(name: str, folder: Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A random model of one family in Hugging Face layout (safetensors + tokenizer), deterministic."""
    torch.manual_seed(seed)
    cfg = tiny_config(name, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random init is small; widen weights so pruning choices are not ties
        for pname, p in model.named_parameters():
            if p.dim() == 2 or (p.dim() == 3 and ".experts." in pname):  # fused experts are [E, out, in]
                p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


TIERS = Path(__file__).with_name("tiers.json")  # measured durations' verdict: tests/tier.py writes it
REAL_MODEL_FIXTURES = {"smollm2_dir"}  # a test that converts the real model is slow whatever it measured
HEAVY_IDS = "NEUROAL_TEST_HEAVY_IDS"  # a folder: each xdist worker writes the ids of its heavy tests there
OTHERS_DONE = "others-done"  # ... and the scheduler a file of this name once every other test is done


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        import tempfile

        os.environ[HEAVY_IDS] = tempfile.mkdtemp(prefix="neuroal-heavy-ids-")  # the workers inherit it


HEAVY: set[str] = set()  # this process's heavy tests (`pytest_collection_modifyitems`)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The fast tier is `pytest -m "not slow"`: besides the tests marked `slow` by hand, those that use
    the real model and those measured too slow for the tier's budget (`tiers.json`) are `slow`.

    The first two kinds are also heavy: under pytest-xdist they run one after another on one worker
    (`pytest_xdist_make_scheduler`); the measured ones (tiny models, a local Ray) share the other."""
    import json

    measured = set(json.loads(TIERS.read_text())["slow"]) if TIERS.exists() else set()
    for item in items:
        if item.get_closest_marker("slow") or REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
            HEAVY.add(item.nodeid)
        elif item.nodeid in measured:
            item.add_marker(pytest.mark.slow)
    if hasattr(config, "workerinput") and os.environ.get(HEAVY_IDS):
        folder = Path(os.environ[HEAVY_IDS])  # written before the worker reports its collection
        tmp = folder / f"{config.workerinput['workerid']}.tmp"
        tmp.write_text(json.dumps(sorted(HEAVY & {item.nodeid for item in items})))
        tmp.replace(tmp.with_suffix(".json"))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """The heavy tests (the real model; those marked slow by hand: Ray job clusters, the 70B shape) run
    one after another on one pytest-xdist worker while the other takes the rest, fast and measured-slow
    (tiny models) in collection order. Two heavy tests at once on two cores ran 2-4x slower each than
    alone (two Ray instances' threads contending), so pairing them cost more than it saved; and the
    session fixtures they share (the SmolLM2 reference prune) are computed once. The other worker used to
    idle once the fast tier was done (~200 s into a ~1,400 s run) while the measured-slow tests queued
    behind the heavy ones: with them beside the heavy ones, CI went from 1,493 to 1,332 s here.
    (xdist's own `loadgroup` cannot do it under pytest 9: the group it appends to a test's id is lost.)"""
    if not os.environ.get(HEAVY_IDS):
        return None  # xdist's default scheduler
    import json

    from xdist.scheduler import LoadScopeScheduling

    folder = Path(os.environ[HEAVY_IDS])

    class HeavyOnOneWorker(LoadScopeScheduling):
        """Scopes are single tests, and one scope of all the heavy ones (the largest: it is sent first)."""

        heavy: set[str] | None = None
        others_left: int | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.heavy is None:  # every worker has reported its collection by now
                self.heavy = {i for f in folder.glob("*.json") for i in json.loads(f.read_text())}
            return "heavy" if nodeid in self.heavy else nodeid

        def mark_test_complete(self, node, item_index: int, duration: float = 0) -> None:
            super().mark_test_complete(node, item_index, duration)
            if self.others_left is None:
                self.others_left = sum(self._split_scope(i) != "heavy" for i in self.collection)
            if self._split_scope(self.registered_collections[node][item_index]) != "heavy":
                self.others_left -= 1
                if self.others_left == 0:
                    (folder / OTHERS_DONE).touch()  # the heavy tests' worker has the cores to itself now

    return HeavyOnOneWorker(config, log)


@pytest.fixture(autouse=True)
def one_thread_while_sharing_cores(request):
    """Under pytest-xdist a test runs on one torch thread while the other worker is busy too: two
    multi-thread OpenMP pools on two cores spin at their barriers for each other's descheduled threads
    (measured: a fast module beside the SmolLM2 zero-shot test took 66 s and 103 s with two threads each,
    42 s and 81 s with one thread for the fast module; the fast tier beside that test took 242 s, and the
    test 171 s, with two threads for it, 198 s and 108 s with one). Once only heavy tests are left (the
    scheduler's `OTHERS_DONE` file), a heavy test keeps torch's default, as it does alone."""
    folder = os.environ.get(HEAVY_IDS)
    if not os.environ.get("PYTEST_XDIST_WORKER") or (
            request.node.nodeid in HEAVY and (not folder or (Path(folder) / OTHERS_DONE).exists())):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer: from the converted model when it is cached, else from the GGUF alone (the
    tiny models need no real weights: the fast tier converts none)."""
    from neuroal.fileio import cache_root
    from neuroal.models import DEFAULT_MODEL, default_tokenizer, load_tokenizer

    converted = cache_root() / "models" / DEFAULT_MODEL
    return load_tokenizer(converted) if (converted / "config.json").exists() else default_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(name, root / name, tokenizer=smollm2_tokenizer) for name in TINY}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir():
    from neuroal.models import resolve_model

    return resolve_model("smollm2-135m")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def separate_node_args() -> dict:
    """What keeps one machine's Ray nodes apart as separate machines are: each node's dashboard agent
    gets a port of its own (every agent asks for 52365 by default, and a node whose agent lost that race
    refuses `ray job submit`: "No available agent to submit job"), and each node unpacks runtime
    environments into a folder of its own (in the shared session folder, a node that unpacks a job's
    working_dir deletes and rewrites the copy another node's driver is importing from)."""
    port = free_port()
    return {"dashboard_agent_listen_port": port, "runtime_env_dir_name": f"runtime_resources_{port}"}


@contextlib.contextmanager
def local_cluster(nodes: int, cpus: int, gpus: int = 0, *, connect: bool = True, **head_args):
    """A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head with no CPUs for
    actors and `nodes` worker nodes of `cpus` CPUs and `gpus` declared GPUs each (placement is real,
    compute falls back to CPU); `connect`: this process joins it as the driver. Yields (cluster, workers).

    Every node on 127.0.0.1: Ray rewrites a loopback address to the machine's outward IP unless told the
    cluster is local-only (its Windows/OSX switch), so that switch is set for this process and the node
    processes it starts, and restored after.
    """
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    old_env, old_flag = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                       "include_dashboard": False, **separate_node_args(), **head_args})
    try:
        workers = [c.add_node(num_cpus=cpus, num_gpus=gpus, node_ip_address="127.0.0.1", **separate_node_args())
                   for _ in range(nodes)]
        c.wait_for_nodes()
        if connect:
            ray.init(address=c.address, logging_level="ERROR")
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old_env


@dataclass
class Executed:
    """A prune executed through its session, read back before the session closed."""

    run: dict  # the run.json content
    weights: dict  # every block's pruned weights, over all shards
    reports: list  # each shard's `Shard.report`
    recoveries: int  # shards restarted and replayed
    nodes: list | None  # the Ray node of each shard (None in process)
    offload: object  # the session's `Offload` (None when resident)


def execute_and_read(spec, out, resume_dir=None) -> Executed:
    """Run `spec` (a PruneSpec) into `out` through `session_for` as the CLI does, and read each shard back."""
    from orchestrator.chain.shard import Shard
    from orchestrator.pruning.job import execute, session_for

    session = session_for(spec, resume_dir=resume_dir)
    chain = session.chain
    try:
        run = execute(spec, out, session=session, resume_dir=resume_dir)
        weights = {}
        for i in range(chain.n_shards):
            weights.update(chain.get(chain.call(i, Shard.block_weights)))
        reports = [chain.get(chain.call(i, Shard.report)) for i in range(chain.n_shards)]
        nodes = None if chain.in_process else chain.node_ids()
    finally:
        session.close()
    return Executed(run, weights, reports, chain.recoveries, nodes, session.offload)


@dataclass
class Reference:
    spec: dict  # build_spec's keywords
    run: dict
    weights: dict


@pytest.fixture(scope="session")
def smollm2_wanda_neuroal(smollm2_dir, shared_data, tmp_path_factory) -> Reference:
    """Wanda + NeuroAL (both steps) at 70% on the real model, in process on one shard: the reference that
    the 3-Ray-shard run (test_real_model) and the offloaded run (test_offload) must equal, computed once."""
    out = tmp_path_factory.mktemp("smollm2-wanda-neuroal")
    spec = dict(model="smollm2-135m", method="wanda", top_up="neuroal", sparsity=0.7, seqlen=32, nsamples=8,
                executor="local", data_dir=str(shared_data), eval="wikitext2", eval_windows=8, out=str(out))
    from orchestrator.spec import build_spec

    done = execute_and_read(build_spec(**spec), out / "run")
    return Reference(spec, done.run, done.weights)


# ----------------------------------------------------------------------------- a user's own lm-eval tasks

USER_MC_YAML = """\
# a multiple-choice task over local jsonl files, its prompt from a `!function` hook next to it
task: colours_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/mc_train.jsonl
    test: {data}/mc_test.jsonl
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: !function hooks.question
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

USER_GEN_YAML = """\
# a generation task over local jsonl files: gsm8k-style answer filters, and a metric of the user's own (a hook)
# that every generated character moves, even a tiny random model's
task: sums_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/gen_train.jsonl
    test: {data}/gen_test.jsonl
training_split: train
fewshot_split: train
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  do_sample: false
  max_gen_toks: 8
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "^ ?(\\\\d+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(\\\\d+)"
      - function: take_first
  - name: whole
    filter:
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
  - metric: !function hooks.answer_chars
    aggregation: mean
    higher_is_better: false
metadata:
  version: 1.0
"""

USER_GROUP_YAML = """\
group: colours_and_sums
task:
  - colours_mc
  - sums_gen
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""

USER_HOOKS = '''\
def question(doc):
    return f"Question: {doc['question']}\\nAnswer:"


def answer_chars(references, predictions):
    return float(len(predictions[0]))
'''


def write_user_tasks(root: Path, n_test: int = 20, n_gen: int = 10) -> Path:
    """A user's task folder as `--zeroshot-include` takes it: a multiple-choice task (`colours_mc`), a
    generation task (`sums_gen`), a group of both (`colours_and_sums`), over jsonl files in `root/data`."""
    import json
    import random

    data, tasks = root / "data", root / "tasks"
    data.mkdir(parents=True, exist_ok=True)
    tasks.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    facts = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
             ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("fresh blood", "red"), ("a lemon", "yellow"),
             ("the night sky", "black"), ("milk", "white"), ("a leaf in summer", "green"), ("the sea", "blue")]

    def mc(i):
        thing, answer = facts[i % len(facts)]
        choices = rng.sample([c for c in colours if c != answer], 3) + [answer]
        rng.shuffle(choices)
        return {"question": f"What colour is {thing}?", "choices": choices, "label": choices.index(answer)}

    def gen(_):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return {"question": f"What is {a} plus {b}?", "answer": str(a + b)}

    for name, make, n in (("mc", mc, n_test), ("gen", gen, n_gen)):
        for split, k, start in (("train", 8, 100), ("test", n, 0)):
            with open(data / f"{name}_{split}.jsonl", "w") as f:
                f.writelines(json.dumps(make(start + i)) + "\n" for i in range(k))
    (tasks / "colours_mc.yaml").write_text(USER_MC_YAML.format(data=data))
    (tasks / "sums_gen.yaml").write_text(USER_GEN_YAML.format(data=data))
    (tasks / "colours_and_sums.yaml").write_text(USER_GROUP_YAML)
    (tasks / "hooks.py").write_text(USER_HOOKS)
    return tasks


@pytest.fixture(scope="session")
def user_tasks(tmp_path_factory) -> Path:
    return write_user_tasks(tmp_path_factory.mktemp("user-tasks"))


# A full run of this suite once ended in a segmentation fault inside the interpreter's own teardown,
# after pytest had printed "765 passed" (native threads of Ray / grpc / lm-eval's imports outliving
# Python's finalisation). The verdict is pytest's: once it has written its summary, the process exits
# with pytest's status and skips that teardown.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))
    if os.environ.get(HEAVY_IDS) and not hasattr(session.config, "workerinput"):
        import shutil

        shutil.rmtree(os.environ.pop(HEAVY_IDS), ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _EXIT_STATUS and not os.environ.get("NEUROAL_TEST_FULL_TEARDOWN"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
