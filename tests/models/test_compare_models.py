"""compare_models on tiny models: identity, agreement with the logits path and with
score_model, statistics against an independent implementation (`pplfast compare`:
tests/cli/test_cli_compare.py)."""
import warnings

import pytest
import torch

import pplfast
from builders import build_model, corpus, rounded_copy, train_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def pair(tokenizer):
    base = build_model("llama", len(tokenizer), context=64)
    return base, rounded_copy(base)


def ids_for(tokenizer, seed, lines=8):
    return torch.tensor(tokenizer(" ".join(corpus(lines, seed=seed)))["input_ids"])


def test_model_against_itself(pair, tokenizer):
    base, _ = pair
    ids = ids_for(tokenizer, 1)
    res = pplfast.compare_models(base, base, ids, window=32, stride=16)
    tc = res.token_comparison
    s = res.scored
    assert res.num_tokens == int(s.sum()) > 100
    assert float(tc.kl[s].abs().max()) == 0.0 and float(tc.kl_reverse[s].abs().max()) == 0.0
    assert res.kl_mean == 0.0 and res.kl_max == 0.0
    assert res.top1_agreement == 1.0 and res.top1_agreement_stderr == 0.0
    assert res.delta_p_mean == 0.0 and res.delta_p_rms == 0.0
    assert res.ln_ppl_ratio == 0.0 and res.ppl_ratio == 1.0
    assert res.perplexity_base == res.perplexity_test


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_matches_logits_path_and_score_model(tokenizer, kind):
    base = build_model(kind, len(tokenizer), context=64)
    test = rounded_copy(base) if kind != "gemma2" else build_model(kind, len(tokenizer),
                                                                    context=64, seed=1)
    ids = torch.stack([ids_for(tokenizer, 2)[:90], ids_for(tokenizer, 3)[:90]])
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    res = pplfast.compare_models(base, test, ids, mask, window=32, stride=16, batch_size=3)
    sb = pplfast.score_model(base, ids, mask, window=32, stride=16)
    st = pplfast.score_model(test, ids, mask, window=32, stride=16)
    assert torch.equal(res.scored, sb.scored)
    tc = res.token_comparison
    torch.testing.assert_close(tc.nll_base, sb.token_nll, rtol=0, atol=2e-5)
    torch.testing.assert_close(tc.nll_test, st.token_nll, rtol=0, atol=2e-5)
    assert res.perplexity_base == pytest.approx(sb.perplexity, rel=1e-5)
    assert res.perplexity_test == pytest.approx(st.perplexity, rel=1e-5)
    # the first window through the models' own logits, compared in float64
    with torch.no_grad():
        lb, lt = base(ids[:, :32]).logits, test(ids[:, :32]).logits
    ref = pplfast.reference.compare(lb[:, :-1], lt[:, :-1], ids[:, 1:32])
    bound = 2e-6 * torch.maximum(torch.logsumexp(lb[:, :-1].double(), -1).abs(),
                                 torch.logsumexp(lt[:, :-1].double(), -1).abs()).clamp_min(1)
    # the two paths differ by the fp32 GEMM rounding of the logits (~1e-6 of them)
    assert bool(((tc.kl[:, 1:32].double() - ref["kl"]).abs() <= bound + 1e-5).all())
    assert float(tc.kl[res.scored].min()) >= 0
    agree = (tc.argmax_base[:, 1:32] == ref["argmax_base"]).float().mean()
    assert agree == 1.0
    assert 0.0 < res.kl_mean and 0.0 < res.top1_agreement <= 1.0


def scaled(model, factor):
    """``model`` whose logits are multiplied by ``factor``: a final transform pplfast does not
    know, so its body and output layer cannot stand for it."""
    import transformers as tf

    class Scaled(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * factor
            return out

    out = Scaled(model.config).eval()
    out.load_state_dict(model.state_dict())
    return out


@pytest.mark.parametrize("case", ["unknown-transform", "different-softcap"])
def test_logits_fallback_with_warning(tokenizer, case):
    """Models the hidden-states path cannot compare are compared from their own logits, with a
    warning; the result is the float64 comparison of those logits within the kernel bound."""
    from helpers import LSE_RTOL

    if case == "unknown-transform":
        base = build_model("llama", len(tokenizer), context=64)
        test = scaled(rounded_copy(base), 1.25)
        warning = "scoring Scaled from its logits: logits differ"
    else:
        base = build_model("gemma2", len(tokenizer), context=64)
        test = build_model("gemma2", len(tokenizer), context=64, seed=1)
        test.config.final_logit_softcapping = 6.0  # base caps at 4.0
        warning = r"their final logit transforms differ \(softcap, temperature: \(4.0, 1.0\)"
    ids = torch.stack([ids_for(tokenizer, 6)[:41], ids_for(tokenizer, 7)[:41]])
    with pytest.warns(UserWarning, match=warning):
        res = pplfast.compare_models(base, test, ids, window=64, batch_size=2)
    assert torch.equal(res.scored[:, 1:], torch.ones(2, 40, dtype=torch.bool))
    with torch.no_grad():  # the one pass compare_models runs: both windows, 40 input tokens
        lb, lt = base(ids[:, :-1]).logits, test(ids[:, :-1]).logits
    ref = pplfast.reference.compare(lb, lt, ids[:, 1:])
    lse_b, lse_t = (torch.logsumexp(x.double(), -1).abs() for x in (lb, lt))
    bound = LSE_RTOL * torch.maximum(lse_b, lse_t).clamp_min(1)
    tc = res.token_comparison
    for field, rows_bound in (("kl", bound), ("kl_reverse", bound),
                              ("nll_base", LSE_RTOL * lse_b.clamp_min(1)),
                              ("nll_test", LSE_RTOL * lse_t.clamp_min(1))):
        err = (getattr(tc, field)[:, 1:].double() - ref[field]).abs()
        assert bool((err <= rows_bound).all()), (field, float(err.max()))
    for field in ("argmax_base", "argmax_test"):
        assert torch.equal(getattr(tc, field)[:, 1:], ref[field]), field
    assert float(tc.kl[:, 1:].min()) >= 0 and res.kl_mean > 1e-3  # the models do differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # score_model warns about the unknown transform too
        alone = pplfast.score_model(test, ids, window=64)
    torch.testing.assert_close(tc.nll_test, alone.token_nll, rtol=0, atol=2e-5)


def test_bad_inputs(pair, tokenizer):
    base, test = pair
    ids = ids_for(tokenizer, 4)[:40]
    other = build_model("llama", len(tokenizer) + 5, context=64)
    with pytest.raises(ValueError, match=r"vocabulary of 320 tokens but test_model has 325"):
        pplfast.compare_models(base, other, ids)
    with pytest.raises(TypeError, match="input_ids must be an int64 or int32 tensor"):
        pplfast.compare_models(base, test, ids.float())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        pplfast.compare_models(base, test, torch.tensor([1, 2, 999]))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        pplfast.compare_models(base, test, ids, batch_size=0)
    with pytest.raises(ValueError, match="nothing to compare"):
        pplfast.compare_models(base, test, ids[:1])


def test_training_mode_restored(pair, tokenizer):
    base, test = pair
    test.train()
    try:
        pplfast.compare_models(base, test, ids_for(tokenizer, 5)[:40], window=32)
        assert test.training and not base.training
    finally:
        test.eval()
