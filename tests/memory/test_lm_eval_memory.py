"""Peak memory of ``loglikelihood_rolling`` and ``loglikelihood`` at a 128k vocabulary: lm-eval's
``hf`` model builds the ``(batch, T, V)`` logits and their float32 log-softmax; the ``pplfast``
model has no such term, with a fixed batch size or ``batch_size=auto``.

Each model is measured in a fresh process (VmHWM before and after the call, after a warm-up
request; :mod:`memory_harness`). The benchmark figures (time and peak growth of both models) by
hand:

    python tests/memory/memory_harness.py tests/memory/test_lm_eval_memory.py measure \
        name=pplfast batch_size=8 kib=200
    python tests/memory/memory_harness.py tests/memory/test_lm_eval_memory.py measure \
        name=hf batch_size=8 kib=200
    python tests/memory/memory_harness.py tests/memory/test_lm_eval_memory.py measure \
        name=pplfast batch_size=auto requests=loglikelihood
"""
import time

import pytest

from memory_harness import in_child, peak_growth

VOCAB = 128256
CONTEXT = 256


def measure(name: str, batch_size, kib: float, vocab: int = VOCAB, requests: str = "rolling",
            max_batch_size: int = 64) -> dict:
    import tempfile

    import torch
    import transformers as tf
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import pplfast.lm_eval
    from builders import corpus, train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=CONTEXT, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=1, pad_token_id=2)
    root = tempfile.mkdtemp()
    tf.LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    cls = pplfast.lm_eval.PplfastLM if name == "pplfast" else HFLM
    lm = cls(pretrained=root, device="cpu", dtype="float32", batch_size=batch_size,
             max_batch_size=max_batch_size)
    text, seed = "", 0
    while len(text) < kib * 1024:
        text += " ".join(corpus(50, seed=seed)) + "\n"
        seed += 1
    docs = [text[i : i + 8192] for i in range(0, len(text), 8192)]

    if requests == "rolling":
        def run(texts):
            return lm.loglikelihood_rolling(
                [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                 for i, t in enumerate(texts)], disable_tqdm=True)
    else:  # multiple-choice style: a long context (left-truncated to the window), 4 endings
        def run(texts):
            out = lm.loglikelihood(
                [Instance(request_type="loglikelihood", doc={}, idx=i,
                          arguments=(t[:-400], " " + " ".join(t[-400:].split()[k : k + 12])))
                 for i, t in enumerate(texts) for k in range(4)], disable_tqdm=True)
            return [lp for lp, _ in out]

    run([docs[0][:2000]])  # warm-up
    start = time.perf_counter()
    out, growth = peak_growth(lambda: run(docs))
    seconds = time.perf_counter() - start
    rows = max_batch_size if batch_size == "auto" else batch_size
    return {"model": name, "batch_size": batch_size, "requests": requests, "vocab": vocab,
            "context": CONTEXT, "text_bytes": len(text), "seconds": seconds,
            "peak_growth": growth, "sum_loglikelihood": float(sum(out)),
            "logits_bytes": rows * CONTEXT * vocab * 4}


def run_measurement(name, batch_size, kib, requests="rolling", max_batch_size=64):
    return in_child(__file__, "measure", name=name, batch_size=batch_size, kib=kib,
                    requests=requests, max_batch_size=max_batch_size, timeout=1800)


def test_peak_memory_has_no_batch_by_time_by_vocab_term():
    pytest.importorskip("lm_eval")
    ours = run_measurement("pplfast", 4, 4)
    control = run_measurement("hf", 4, 4)
    assert ours["sum_loglikelihood"] == pytest.approx(control["sum_loglikelihood"], rel=1e-5)
    logits = control["logits_bytes"]  # one (batch, T, V) float32 tensor: 500 MiB here
    assert control["peak_growth"] >= logits, control  # the live control shows the term
    assert ours["peak_growth"] <= logits / 4, ours


def test_loglikelihood_and_auto_batch_size_have_no_such_term():
    """loglikelihood requests (one statistics pass) with batch_size=auto (sized on pplfast's pass,
    at most 4 rows here) against hf at 4 rows a pass."""
    pytest.importorskip("lm_eval")
    ours = run_measurement("pplfast", "auto", 4, "loglikelihood", max_batch_size=4)
    control = run_measurement("hf", 4, 4, "loglikelihood")
    assert ours["sum_loglikelihood"] == pytest.approx(control["sum_loglikelihood"], rel=1e-5)
    logits = control["logits_bytes"]
    assert control["peak_growth"] >= logits, control
    assert ours["peak_growth"] <= logits / 4, ours

