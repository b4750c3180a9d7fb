"""The ``pplfast`` lm-evaluation-harness model against lm-eval's own ``HFLM`` on the same model.

Offline: a tiny Llama and a tokenizer trained in the test, saved to a temporary directory; a local
task over a local JSON-lines file, modelled on lm-eval's wikitext task (`pplfast eval`:
tests/cli/test_cli_eval.py).
"""
import os

import pytest
import torch

from builders import corpus, local_task, save_tiny_llama

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CONTEXT = 48


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_llama(root, context=CONTEXT)
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
        assert abs(g - w) <= 1e-4  # per request, in float32 (issue 12)
    assert len(hf.tok_encode(texts[0])) < CONTEXT  # one window
    assert len(hf.tok_encode(texts[-1])) > 3 * CONTEXT  # several windows per document


def choice_requests(n=10, seed=21):
    """``n`` loglikelihood requests of different lengths (contexts of 1 to 24 words)."""
    import random

    rng = random.Random(seed)
    words = " ".join(corpus(60, seed=seed)).split()
    pairs = []
    for i in range(n):
        start, size = rng.randrange(200), rng.randrange(1, 25)
        pairs.append((" ".join(words[start : start + size]),
                      " " + " ".join(words[start + size : start + size + 1 + i % 3])))
    return [instance("loglikelihood", p, i) for i, p in enumerate(pairs)]


def assert_same_answers(got, want):
    assert len(got) == len(want)
    for (lp_g, greedy_g), (lp_w, greedy_w) in zip(got, want):
        assert abs(lp_g - lp_w) <= 1e-4
        assert greedy_g == greedy_w


def test_one_statistics_pass_gives_loglikelihood_and_greedy(saved, monkeypatch):
    """loglikelihood: one linear_token_stats call (top_k=0) per batch gives both the NLL and the
    argmax, and its NLL is linear_token_nll's bit for bit; rolling windows (no is_greedy) use
    linear_token_nll alone."""
    import pplfast.models.lm_eval as module

    real_stats, real_nll = module.linear_token_stats, module.linear_token_nll
    calls = {"stats": 0, "nll": 0}

    def stats(*args, **kwargs):
        calls["stats"] += 1
        assert kwargs.pop("top_k") == 0
        out = real_stats(*args, top_k=0, **kwargs)
        assert torch.equal(out.nll, real_nll(*args, **kwargs))
        return out

    def nll(*args, **kwargs):
        calls["nll"] += 1
        return real_nll(*args, **kwargs)

    monkeypatch.setattr(module, "linear_token_stats", stats)
    monkeypatch.setattr(module, "linear_token_nll", nll)
    hf, ours = models(saved, batch_size=3)
    requests = choice_requests(7)
    got = ours.loglikelihood(requests)
    assert calls == {"stats": 3, "nll": 0}  # 7 requests, 3 per batch
    assert_same_answers(got, hf.loglikelihood(requests))
    rolling = [instance("loglikelihood_rolling", (" ".join(corpus(12, seed=8)),))]
    got = ours.loglikelihood_rolling(rolling)
    assert calls["stats"] == 3 and calls["nll"] >= 2
    assert abs(got[0] - hf.loglikelihood_rolling(rolling)[0]) <= 1e-4


def test_model_args_backend_and_pplfast_backend(saved, monkeypatch):
    """backend= is HFLM's own model type, passed through; pplfast's kernel backend is
    pplfast_backend=."""
    import pplfast.models.lm_eval as module

    seen = []
    real = module.linear_token_stats

    def stats(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "linear_token_stats", stats)
    lm = module.PplfastLM.create_from_arg_string(
        f"pretrained={saved / 'model'},backend=causal,pplfast_backend=reference,dtype=float32,"
        "device=cpu", {"batch_size": 2})
    assert lm.backend == "causal" and lm.pplfast_backend == "reference"
    requests = choice_requests(4)
    got = lm.loglikelihood(requests)
    assert seen == ["reference", "reference"]
    hf, _ = models(saved)
    assert_same_answers(got, hf.loglikelihood(requests))
    path = str(saved / "model")
    with pytest.raises(ValueError, match="pplfast's kernel backend is pplfast_backend=triton"):
        module.PplfastLM(pretrained=path, backend="triton")
    with pytest.raises(ValueError, match="pplfast_backend must be one of .* got 'causal'"):
        module.PplfastLM(pretrained=path, pplfast_backend="causal")


def record_passes(lm):
    """Row and column counts of every forward pass of the model body, and of the whole model."""
    body, whole = [], []

    def hook(into):
        def record(module, args, kwargs):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            into.append(tuple(ids.shape))
        return record

    lm.model.get_decoder().register_forward_pre_hook(hook(body), with_kwargs=True)
    lm.model.register_forward_pre_hook(hook(whole), with_kwargs=True)
    return body, whole


@pytest.mark.parametrize("batch_size", ["auto", "auto:2"])
def test_batch_size_auto(saved, batch_size):
    """batch_size=auto tries pplfast's own pass from max_batch_size down (never the model's
    logits) and scores with the size found; auto:N sizes again at each of N runs of requests."""
    import pplfast.lm_eval

    hf, _ = models(saved)
    ours = pplfast.lm_eval.PplfastLM(pretrained=str(saved / "model"), device="cpu",
                                     dtype="float32", batch_size=batch_size, max_batch_size=4)
    body, whole = record_passes(ours)
    requests = choice_requests(10)
    got = ours.loglikelihood(requests)
    assert_same_answers(got, hf.loglikelihood(requests))
    assert [s for s in whole if s[0] > 1] == []  # only the 1-row probe ran the whole model
    lengths = sorted((min(CONTEXT, len(hf.tok_encode(c)) + len(hf.tok_encode(x)) - 1)
                      for c, x in (r.args for r in requests)), reverse=True)
    assert lengths[0] == CONTEXT > lengths[8]
    # the probes: the whole model, then its body; the padding check (half the ids, then padded)
    assert [s[0] for s in body[:4]] == [1, 1, 1, 1]
    passes = body[4:]
    tries = [(4, lengths[0])] * 2  # 4 rows fit at once: two passes at the longest length
    if batch_size == "auto":
        assert passes[:2] == tries and [s[0] for s in passes[2:]] == [4, 4, 2]
    else:  # a second run starts at request 5 (of 10): sized again at its length
        assert passes[:2] == tries and [s[0] for s in passes[2:4]] == [4, 4]
        assert passes[4:6] == [(4, lengths[8])] * 2 and [s[0] for s in passes[6:]] == [2]
    # rolling: sized once for full windows, then windows batched that many at a time
    ours = pplfast.lm_eval.PplfastLM(pretrained=str(saved / "model"), device="cpu",
                                     dtype="float32", batch_size=batch_size, max_batch_size=3)
    body, whole = record_passes(ours)
    texts = [" ".join(corpus(12, seed=4)), " ".join(corpus(6, seed=6))]
    rolling = [instance("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)]
    got = ours.loglikelihood_rolling(rolling)
    for g, w in zip(got, hf.loglikelihood_rolling(rolling)):
        assert abs(g - w) <= 1e-4
    windows = sum(-(-len(hf.tok_encode(t)) // CONTEXT) for t in texts)
    sizes = [s[0] for s in body[6:]]
    assert body[4:6] == [(3, CONTEXT)] * 2 and [s[0] for s in whole if s[0] > 1] == []
    assert sizes == [3] * (windows // 3) + ([windows % 3] if windows % 3 else [])
    assert ours.batch_size == batch_size.split(":")[0]


def test_batch_size_auto_backs_off_on_out_of_memory(saved):
    """An out-of-memory error in pplfast's pass lowers the size, as in HFLM's detection."""
    import pplfast.lm_eval

    ours = pplfast.lm_eval.PplfastLM(pretrained=str(saved / "model"), device="cpu",
                                     dtype="float32", batch_size="auto", max_batch_size=16)

    def out_of_memory(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    ours.model.get_decoder().register_forward_pre_hook(out_of_memory, with_kwargs=True)
    body, _ = record_passes(ours)
    requests = choice_requests(12)
    got = ours.loglikelihood(requests)
    hf, _ = models(saved)
    assert_same_answers(got, hf.loglikelihood(requests))
    # 16 rows failed (the hook runs first), so did every size above 8; 8 fit
    assert [s[0] for s in body[4:]] == [8, 8, 8, 4]  # after the probes' four 1-row calls


def test_fallback_to_hflm_with_a_warning(saved):
    """A model whose logits are not its body and output layer (an unknown final transform) is
    scored by HFLM's own code: the same numbers as HFLM, and a warning."""
    import transformers as tf
    from lm_eval.models.huggingface import HFLM

    import pplfast.lm_eval

    class Scaled(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.5
            return out

    plain = tf.AutoModelForCausalLM.from_pretrained(saved / "model", dtype=torch.float32)
    model = Scaled(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    tokenizer = tf.AutoTokenizer.from_pretrained(saved / "model")
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
    ours = pplfast.lm_eval.PplfastLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
    requests = choice_requests(5)
    with pytest.warns(UserWarning, match="scoring with lm-eval's own HFLM code"), \
            pytest.warns(UserWarning, match="scoring Scaled from its logits: logits differ"):
        got = ours.loglikelihood(requests)
    assert got == hf.loglikelihood(requests)
    rolling = [instance("loglikelihood_rolling", (" ".join(corpus(12, seed=4)),))]
    assert ours.loglikelihood_rolling(rolling) == hf.loglikelihood_rolling(rolling)
    # the transform matters: the plain model's scores differ
    _, unscaled = models(saved)
    assert all(abs(a[0] - b[0]) > 1e-2 for a, b in zip(got, unscaled.loglikelihood(requests)))


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
