"""The ``pplfast`` lm-evaluation-harness model against lm-eval's own ``HFLM`` on the same model.

Offline: a tiny Llama and a tokenizer trained in the test, saved to a temporary directory; a local
task over a local JSON-lines file, modelled on lm-eval's wikitext task.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from test_hf import build_model, corpus, train_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CONTEXT = 48


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=CONTEXT)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def models(root, batch_size=3):
    from lm_eval.models.huggingface import HFLM

    import pplfast.lm_eval  # noqa: F401

    args = dict(pretrained=str(root / "model"), device="cpu", dtype="float32",
                batch_size=batch_size)
    return HFLM(**args), pplfast.lm_eval.PplfastLM(**args)


def instance(kind, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_loglikelihood_equals_hflm(saved):
    hf, ours = models(saved)
    words = " ".join(corpus(40, seed=9)).split()
    shared = " ".join(words[:3])
    long_context = " ".join(words[:80])  # far longer than the 48-token window: left-truncated
    pairs = [(shared, " the"), (shared, " of the model"), (shared, " " + " ".join(words[3:6])),
             (" ".join(words[7:9]), " " + words[10]), (long_context, " " + " ".join(words[81:84])),
             (long_context, " x")]
    requests = [instance("loglikelihood", p, i) for i, p in enumerate(pairs)]
    want = hf.loglikelihood(requests)
    got = ours.loglikelihood(requests)
    assert len(got) == len(want)
    for (lp_w, greedy_w), (lp_g, greedy_g) in zip(want, got):
        assert lp_g == pytest.approx(lp_w, abs=1e-4)
        assert greedy_g == greedy_w


def test_greedy_is_exercised(saved):
    """A continuation made of the model's own argmax tokens is greedy for both."""
    hf, ours = models(saved)
    tok = hf.tokenizer
    context = " ".join(" ".join(corpus(3, seed=2)).split()[:8])
    ids = tok(context)["input_ids"]
    with torch.no_grad():
        nxt = int(hf.model(torch.tensor([ids])).logits[0, -1].argmax())
    request = [instance("loglikelihood", (context, tok.decode([nxt])))]
    want, got = hf.loglikelihood(request), ours.loglikelihood(request)
    assert tok(context + tok.decode([nxt]))["input_ids"][len(ids):] == [nxt]
    assert want[0][1] and got[0][1]
    assert got[0][0] == pytest.approx(want[0][0], abs=1e-4)


def test_loglikelihood_rolling_equals_hflm(saved):
    hf, ours = models(saved, batch_size=4)
    texts = [" ".join(corpus(1, seed=3)), " ".join(corpus(12, seed=4)), " ".join(corpus(30, seed=5))]
    requests = [instance("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)]
    want = hf.loglikelihood_rolling(requests)
    got = ours.loglikelihood_rolling(requests)
    for w, g in zip(want, got):
        assert g == pytest.approx(w, abs=1e-4 * max(1, len(texts[-1].split())))
    assert len(hf.tok_encode(texts[-1])) > 3 * CONTEXT  # several windows per document


TASK = textwrap.dedent("""\
    task: pplfast_local_text
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
      - metric: byte_perplexity
      - metric: bits_per_byte
    metadata:
      version: 1.0
    """)


def local_task(root):
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(corpus(n, seed=n))}) + "\n"
                            for n in (2, 7, 20)))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "local.yaml").write_text(TASK.format(data=data))
    return tasks


def test_simple_evaluate_same_metrics(saved):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import pplfast.lm_eval  # noqa: F401

    manager = TaskManager(include_path=str(local_task(saved)))
    results = {}
    for name in ("hf", "pplfast"):
        out = lm_eval.simple_evaluate(
            model=name, model_args=f"pretrained={saved / 'model'},dtype=float32,device=cpu",
            tasks=["pplfast_local_text"], task_manager=manager, batch_size=2)
        results[name] = out["results"]["pplfast_local_text"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert results["pplfast"][metric] == pytest.approx(results["hf"][metric], rel=1e-5), metric


def test_pplfast_eval_command(saved):
    tasks = local_task(saved)
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast.cli", "eval", "--model_args",
         f"pretrained={saved / 'model'},dtype=float32", "--device", "cpu", "--tasks",
         "pplfast_local_text", "--include_path", str(tasks), "--batch_size", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pplfast" in proc.stdout and "word_perplexity" in proc.stdout


def test_eval_argv():
    from pplfast.eval_cli import lm_eval_argv

    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "pplfast", "--tasks", "x"]
    assert lm_eval_argv(["run", "--model", "hf"]) == ["run", "--model", "hf"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]
