"""compare_models and `pplfast compare` on tiny models: identity, agreement with the logits path
and with score_model, statistics against an independent implementation, CLI end to end."""
import copy
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

import pplfast
from pplfast.cli import main
from test_hf import build_model, corpus, train_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def rounded_copy(model, dtype=torch.bfloat16):
    """The model with every weight rounded to ``dtype`` (kept in float32)."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            p.copy_(p.to(dtype).float())
    return copy_


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


# ---- CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, pair, tokenizer):
    root = tmp_path_factory.mktemp("compare")
    base, test = pair
    for name, model in (("base", base), ("test", test)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    other_tok = train_tokenizer(vocab_size=300)
    other = build_model("llama", len(other_tok), context=64)
    other.save_pretrained(root / "other")
    other_tok.save_pretrained(root / "other")
    texts = [" ".join(corpus(n, seed=40 + n)) for n in (3, 12, 6)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root, texts


def run_cli(capsys, *argv):
    rc = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_per_token_plot(saved, pair, tokenizer, capsys):
    root, texts = saved
    base, test = pair
    per_token, plot = root / "tokens.jsonl", root / "kl.png"
    rc, out, err = run_cli(capsys, "--base", root / "base", "--model", root / "test", "--input",
                           root / "docs.jsonl", "--window", 32, "--stride", 16, "--json",
                           "--per-token", per_token, "--plot", plot, "--no-progress")
    assert rc == 0, err
    figures = json.loads(out)
    docs = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    ids = torch.zeros(len(docs), max(map(len, docs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, d in enumerate(docs):
        ids[i, : len(d)], mask[i, : len(d)] = d, 1
    expected = pplfast.compare_models(base, test, ids, mask, window=32, stride=16)
    for key in ("kl_mean", "perplexity_base", "perplexity_test", "top1_agreement", "kl_max",
                "delta_p_rms", "ln_ppl_ratio"):
        assert figures[key] == pytest.approx(getattr(expected, key), rel=1e-6), key
    assert figures["num_tokens"] == expected.num_tokens
    assert set(figures["kl_percentiles"]) == {"99.9", "99.0", "95.0", "90.0", "50.0", "10.0",
                                              "5.0", "1.0", "0.1"}
    rows = [json.loads(line) for line in per_token.read_text().splitlines()]
    assert len(rows) == sum(len(d) for d in docs)
    scored_rows = [r for r in rows if r["kl"] is not None]
    assert len(scored_rows) == expected.num_tokens
    row = scored_rows[5]
    assert {"kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test",
            "argmax_base_token", "argmax_test_token", "token"} <= set(row)
    assert row["argmax_base_token"] == tokenizer.decode([row["argmax_base"]])
    assert sum(r["kl"] for r in scored_rows) / len(scored_rows) == pytest.approx(
        expected.kl_mean, rel=1e-5)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table(saved, capsys):
    root, _ = saved
    rc, out, err = run_cli(capsys, "--base", root / "base", "--model", root / "base", "--input",
                           root / "docs.jsonl", "--window", 32, "--no-progress",
                           "--device-base", "cpu", "--device", "cpu")
    assert rc == 0, err
    for block in ("Perplexity statistics", "KL divergence statistics",
                  "Token probability statistics"):
        assert f"====== {block} ======" in out
    lines = {k.strip(): v.strip() for k, v in (line.split(" : ", 1) for line in out.splitlines()
                                               if " : " in line)}
    assert lines["Mean    KLD"].startswith("0.000000 ±")
    assert lines["Same top p"].startswith("100.000%")


@pytest.mark.parametrize("case", ["missing-base", "other-tokenizer", "bad-window"])
def test_cli_errors_one_line(saved, capsys, case):
    root, _ = saved
    args = {"missing-base": ["--base", root / "nope", "--model", root / "test"],
            "other-tokenizer": ["--base", root / "base", "--model", root / "other"],
            "bad-window": ["--base", root / "base", "--model", root / "test", "--window", 500],
            }[case]
    rc, out, err = run_cli(capsys, *args, "--input", root / "docs.jsonl", "--no-progress")
    assert rc == 1 and out == ""
    assert err.startswith("pplfast compare: error: ") and err.count("\n") == 1, err
    expected = {"missing-base": "does not exist", "other-tokenizer": "tokenizers",
                "bad-window": "longer than the context length"}[case]
    assert expected in err


def test_console_script_no_traceback(saved):
    root, _ = saved
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast.cli", "compare", "--base", str(root / "base"),
         "--model", str(root / "other"), "--input", str(root / "docs.jsonl"), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("pplfast compare: error: the tokenizers")
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast.cli", "compare", "--base", str(root / "base"),
         "--model", str(root / "test"), "--input", str(root / "docs.jsonl"), "--window", "32",
         "--json", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["top1_agreement"] > 0.9 and figures["kl_mean"] < 1e-2
