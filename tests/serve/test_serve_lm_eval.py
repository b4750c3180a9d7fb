"""lm-eval's own API models against `pplfast serve`: ``local-completions`` (with the model's
tokenizer, and with the server's tokenizer endpoints: ``tokenizer_backend="auto"``) and
``sglang-generate``, on a local multiple-choice task and a local rolling-perplexity task. Every
request's result equals lm-eval's in-process ``pplfast`` model (``pplfast eval``) and ``hf``
(HFLM) within 1e-4.

lm-eval's API models keep one token of ``max_length`` for the generated one: with
``max_length = context + 1`` they send prompts of at most ``context`` tokens (rolling windows of
``context - 1`` predicted tokens), which is what HFLM does with ``max_length = context - 1``.
"""
import json
import os
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
pytest.importorskip("tenacity")  # lm-eval's API models

from builders import corpus  # noqa: E402
from test_serve_api import CONTEXT, ServerProcess, save_models  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MC = textwrap.dedent("""\
    task: pplfast_serve_mc
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{{{question}}}}"
    doc_to_choice: "{{{{choices}}}}"
    doc_to_target: "{{{{answer}}}}"
    target_delimiter: ""
    metric_list:
      - metric: acc
    metadata:
      version: 1.0
    """)

ROLLING = textwrap.dedent("""\
    task: pplfast_serve_rolling
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: loglikelihood_rolling
    doc_to_text: ""
    doc_to_target: "{{{{text}}}}"
    should_decontaminate: false
    metric_list:
      - metric: word_perplexity
    metadata:
      version: 1.0
    """)
TASKS = ["pplfast_serve_mc", "pplfast_serve_rolling"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import random

    import transformers as tf

    root = tmp_path_factory.mktemp("serve_lm_eval")
    (path,) = save_models(root)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(5)
    words = " ".join(corpus(80, seed=5)).split()
    docs = []
    for i in range(12):
        start = rng.randrange(300)
        question = " ".join(words[start : start + rng.randint(2, 60)])  # some past the context
        choices = [" " + " ".join(words[start + 60 + k : start + 61 + k + k % 3])
                   for k in range(4)]
        if i < 4:  # a choice made of the model's greedy token, so that is_greedy is exercised
            ids = tokenizer(question)["input_ids"][-CONTEXT + 2:]
            with torch.no_grad():
                greedy = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            choices[0] = tokenizer.decode([greedy])
        docs.append({"question": question, "choices": choices, "answer": i % 4})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": " ".join(corpus(n, seed=n))})
                                             + "\n" for n in (2, 7, 20)))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC.format(data=root / "mc.jsonl"))
    (tasks / "rolling.yaml").write_text(ROLLING.format(data=root / "text.jsonl"))
    server = ServerProcess([path, "--max-wait-ms", "10"])
    yield path, tasks, server
    assert server.stop() == 0


def evaluate(model, model_args, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import pplfast.lm_eval  # noqa: F401  (registers "pplfast")

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS,
                                  task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True, batch_size=4)
    return {task: {s["doc_id"]: s["resps"] for s in out["samples"][task]} for task in TASKS}


@pytest.fixture(scope="module")
def in_process(setup):
    path, tasks, _ = setup
    args = f"pretrained={path},dtype=float32,device=cpu,max_length={CONTEXT - 1}"
    return {name: evaluate(name, args, tasks) for name in ("hf", "pplfast")}


def assert_same(got, want, *, greedy=True):
    rolling = got["pplfast_serve_rolling"]
    assert set(rolling) == set(want["pplfast_serve_rolling"]) == {0, 1, 2}
    for doc, resps in rolling.items():
        assert abs(resps[0][0] - want["pplfast_serve_rolling"][doc][0][0]) <= 1e-4
    mc = got["pplfast_serve_mc"]
    assert len(mc) == 12
    for doc, resps in mc.items():
        for (ll, is_greedy), (ll_w, greedy_w) in zip((r[0] for r in resps),
                                                     (r[0] for r in want["pplfast_serve_mc"][doc])):
            assert abs(ll - ll_w) <= 1e-4
            if greedy:
                assert is_greedy == greedy_w


@pytest.mark.parametrize("tokenizer_backend", ["huggingface", "auto"])
def test_local_completions_equals_pplfast_eval_and_hf(setup, in_process, tokenizer_backend):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    path, tasks, server = setup
    hf, ours = in_process["hf"], in_process["pplfast"]
    assert sum(r[0][1] for resps in hf["pplfast_serve_mc"].values() for r in resps) >= 2
    assert_same(ours, hf)
    args = (f"base_url={server.url}/v1/completions,model={path},max_length={CONTEXT + 1},"
            f"num_concurrent=4,tokenizer_backend={tokenizer_backend}")
    assert_same(evaluate("local-completions", args, tasks), ours)
    if tokenizer_backend == "auto":  # lm-eval found the server's tokenizer endpoints
        from lm_eval.utils import RemoteTokenizer

        lm = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model=path,
                                 tokenizer_backend="auto")
        assert isinstance(lm.tokenizer, RemoteTokenizer)


def test_sglang_generate_equals_pplfast_eval(setup, in_process):
    path, tasks, server = setup
    args = (f"base_url={server.url}/generate,model={path},max_length={CONTEXT + 1},"
            "tokenizer_backend=huggingface")
    # lm-eval's sglang-generate reads is_greedy inverted (x[1] != y[0][1]): sums only
    assert_same(evaluate("sglang-generate", args, tasks), in_process["pplfast"], greedy=False)
