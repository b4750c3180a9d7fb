"""score_model / score_texts (pplfast.models: head, runner, score) on tiny random-weight GPT-2,
Llama, Gemma 2, Cohere and Granite models.

Every figure is checked against the model's own logits: its loss for one window, and explicit
loops over the Hugging Face guide's sliding windows and lm-evaluation-harness rolling windows.
"""
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

import pplfast
from pplfast import score_model, score_texts
from builders import WORDS, build_model, corpus, train_tokenizer
from helpers import assert_nll_close
from test_windows import hf_guide_sliding, lm_eval_rolling

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

# fp32 body and output layer: the only difference from the model's loss is the order of the
# D-term dot products and of the logsumexp, ~1e-6 relative
RTOL = 1e-5

@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {kind: build_model(kind, len(tokenizer))
            for kind in ("gpt2", "llama", "gemma2", "cohere", "granite")}


def encode(tokenizer, seed, lines=6):
    return torch.tensor(tokenizer(" ".join(corpus(lines, seed=seed)))["input_ids"])


def model_token_nll(model, ids):
    """float64 NLL of ids[1:] from the model's own logits on ids."""
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
    return F.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2", "cohere", "granite"])
def test_single_window_equals_model_loss(models, tokenizer, kind, recwarn):
    model = models[kind]
    ids = encode(tokenizer, seed=1)[:63]
    res = score_model(model, ids)
    with torch.no_grad():
        loss = model(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()
    assert res.num_tokens == len(ids) - 1
    assert res.mean_nll == pytest.approx(loss, rel=RTOL)
    assert res.perplexity == pytest.approx(math.exp(loss), rel=RTOL)
    assert res.token_nll.shape == ids.shape and not res.scored[0] and res.scored[1:].all()
    expected = model_token_nll(model, ids)
    assert_nll_close(res.token_nll[1:], expected, expected.abs() + math.log(len(tokenizer)),
                     rtol=RTOL)
    # the hidden-states path ran: no fall-back to logits
    assert not [w for w in recwarn if "pplfast" in str(w.message)]


def test_gemma2_softcap_matters(models, tokenizer):
    model = models["gemma2"]
    ids = encode(tokenizer, seed=2)[:40]
    with torch.no_grad():
        hidden = model.model(ids.unsqueeze(0)).last_hidden_state
        weight = model.get_output_embeddings().weight
        uncapped = pplfast.linear_token_nll(hidden, weight, ids.unsqueeze(0), shift=True).mean().item()
    capped = score_model(model, ids).mean_nll
    assert abs(uncapped - capped) > 0.1  # control: the cap is not a no-op on these logits
    assert capped == pytest.approx(model_token_nll(model, ids).mean().item(), rel=RTOL)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_documents_alone(models, tokenizer, kind, side):
    model = models[kind]
    docs = [encode(tokenizer, seed=s, lines=n)[:cut] for s, n, cut in ((3, 4, 30), (4, 2, 11), (5, 6, 45))]
    T = max(len(d) for d in docs)
    ids = torch.full((len(docs), T), 2, dtype=torch.long)
    mask = torch.zeros(len(docs), T, dtype=torch.long)
    for b, d in enumerate(docs):
        sl = slice(0, len(d)) if side == "right" else slice(T - len(d), T)
        ids[b, sl], mask[b, sl] = d, 1
    res = score_model(model, ids, mask, batch_size=2)
    total, count = 0.0, 0
    for b, d in enumerate(docs):
        sl = slice(0, len(d)) if side == "right" else slice(T - len(d), T)
        expected = model_token_nll(model, d)
        assert_nll_close(res.token_nll[b, sl][1:], expected, expected.abs() + 6, rtol=RTOL)
        assert res.scored[b, sl][1:].all() and int(res.scored[b].sum()) == len(d) - 1
        total, count = total + expected.sum().item(), count + len(d) - 1
    assert res.num_tokens == count
    assert res.mean_nll == pytest.approx(total / count, rel=RTOL)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
def test_right_padded_batches_run_without_the_mask(models, tokenizer, kind, monkeypatch):
    # a causal body gives the real tokens of a right-padded row the outputs of the row alone, so
    # the probe lets the padded passes run unmasked (the faster attention); the scores stay
    # those of each document alone
    from pplfast.models import head

    model = models[kind]
    body = head.find_head(model).body
    masks, forward = [], body.forward
    def spy(input_ids, attention_mask=None, **kwargs):
        masks.append(attention_mask)
        return forward(input_ids, attention_mask=attention_mask, **kwargs)
    monkeypatch.setattr(body, "forward", spy)
    docs = [encode(tokenizer, seed=s, lines=4)[:cut] for s, cut in ((6, 37), (7, 12))]
    ids = torch.full((2, 37), 2, dtype=torch.long)
    mask = torch.zeros(2, 37, dtype=torch.long)
    for b, d in enumerate(docs):
        ids[b, :len(d)], mask[b, :len(d)] = d, 1
    res = score_model(model, ids, mask, batch_size=2)
    assert masks and all(m is None for m in masks)
    for b, d in enumerate(docs):
        expected = model_token_nll(model, d)
        assert_nll_close(res.token_nll[b, 1:len(d)], expected, expected.abs() + 6, rtol=RTOL)


def test_a_body_that_sees_its_padding_keeps_the_mask(models, tokenizer):
    from pplfast.models import head

    class Leaky(torch.nn.Module):  # every position also sees the row's mean: the pads included
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, input_ids, attention_mask=None, **kwargs):
            hidden = self.body(input_ids, attention_mask=attention_mask).last_hidden_state
            return hidden + hidden.mean(1, keepdim=True)

    ids = encode(tokenizer, seed=8)[:16].unsqueeze(0)
    body = models["llama"].model
    assert not head.needs_pad_mask(body, ids)  # control: the causal body needs no mask
    assert head.needs_pad_mask(Leaky(body), ids)
    assert head.needs_pad_mask(body, ids[:, :3])  # too short to tell: keep it


@pytest.mark.parametrize("kind", ["gpt2", "gemma2"])
@pytest.mark.parametrize("window,stride", [(16, 5), (24, 12), (9, 8)])
def test_sliding_equals_explicit_loop(models, tokenizer, kind, window, stride):
    model = models[kind]
    ids = encode(tokenizer, seed=6, lines=8)[:70]
    expected = torch.zeros(len(ids), dtype=torch.float64)
    seen = torch.zeros(len(ids), dtype=torch.bool)
    for begin, end, first in hf_guide_sliding(len(ids), window, stride):
        nll = model_token_nll(model, ids[begin:end])  # targets begin+1 .. end-1
        expected[first:end] = nll[first - begin - 1 :]
        assert not seen[first:end].any()
        seen[first:end] = True
    res = score_model(model, ids, window=window, stride=stride, batch_size=3)
    assert torch.equal(res.scored, seen)
    assert_nll_close(res.token_nll[1:], expected[1:], expected[1:] + 6, rtol=RTOL)
    assert res.mean_nll == pytest.approx(expected[1:].mean().item(), rel=RTOL)
    # control: the windows give less context than one pass, and that changes the figures
    assert abs(res.mean_nll - score_model(model, ids).mean_nll) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("window", [8, 13, 70])
def test_rolling_equals_lm_eval_loop(models, tokenizer, kind, window):
    model = models[kind]
    ids = encode(tokenizer, seed=7, lines=8)[:61]
    prefix = 1
    expected = []
    for context, continuation in lm_eval_rolling(ids.tolist(), prefix, window):
        inp = torch.tensor(context + continuation)  # lm-eval feeds inp[:-1], scores continuation
        expected.append(model_token_nll(model, inp)[-len(continuation):])
    expected = torch.cat(expected)
    res = score_model(model, ids, window=window, mode="rolling", prefix_token_id=prefix)
    assert res.scored.all() and res.num_tokens == len(ids)
    assert_nll_close(res.token_nll, expected, expected + 6, rtol=RTOL)
    assert res.mean_nll == pytest.approx(expected.mean().item(), rel=RTOL)


def test_chunks_and_default_window(models, tokenizer):
    model = build_model("gpt2", len(tokenizer), context=32)
    ids = encode(tokenizer, seed=8, lines=8)[:75]
    res = score_model(model, ids, window=20, mode="chunks")
    for begin in range(0, len(ids), 20):
        chunk = ids[begin : begin + 20]
        assert not res.scored[begin]
        if len(chunk) > 1:
            expected = model_token_nll(model, chunk)
            assert_nll_close(res.token_nll[begin + 1 : begin + len(chunk)], expected, expected + 6,
                             rtol=RTOL)
    assert res.num_tokens == len(ids) - 4
    # no window given: the model's context (32) with stride 16, not one 75-token pass
    default = score_model(model, ids)
    explicit = score_model(model, ids, window=32, stride=16)
    assert torch.equal(default.token_nll, explicit.token_nll) and default.num_tokens == len(ids) - 1


class LogitsOnly(torch.nn.Module):
    """A model that gives logits and nothing else: no body, no output layer to reach."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def test_fallback_to_logits(models, tokenizer):
    ids = encode(tokenizer, seed=9)[:40]
    expected = model_token_nll(models["llama"], ids)
    res = score_model(LogitsOnly(models["llama"]), torch.stack([ids, ids]), window=16, stride=8)
    ref = score_model(models["llama"], torch.stack([ids, ids]), window=16, stride=8)
    assert_nll_close(res.token_nll, ref.token_nll, rtol=RTOL)
    assert res.num_tokens == 2 * (len(ids) - 1)
    single = score_model(LogitsOnly(models["llama"]), ids)
    assert_nll_close(single.token_nll[1:], expected, expected + 6, rtol=RTOL)


def test_unknown_output_transform_is_caught(models, tokenizer):
    import transformers as tf

    class Scaled(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = Scaled(models["llama"].config).eval()
    model.load_state_dict(models["llama"].state_dict())
    ids = encode(tokenizer, seed=10)[:30]
    with pytest.warns(UserWarning, match="from its logits"):
        res = score_model(model, ids)
    expected = model_token_nll(model, ids)
    assert_nll_close(res.token_nll[1:], expected, expected + 6, rtol=RTOL)


def test_training_mode_restored_and_bad_input(models, tokenizer):
    model = models["gpt2"]
    model.train()
    ids = encode(tokenizer, seed=11)[:30]
    try:
        a, b = score_model(model, ids), score_model(model, ids)  # dropout off while scoring
        assert torch.equal(a.token_nll, b.token_nll) and model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="contiguous"):
        score_model(model, ids.unsqueeze(0), torch.tensor([[1, 0] * 15]))
    with pytest.raises(TypeError, match="input_ids .* got torch.float32"):
        score_model(model, ids.float())
    with pytest.raises(ValueError, match="mode must be one of"):
        score_model(model, ids, mode="bogus")
    with pytest.raises(ValueError, match="batch_size"):
        score_model(model, ids, batch_size=0)
    empty = score_model(model, ids[:1])
    assert empty.num_tokens == 0 and math.isnan(empty.perplexity)


@pytest.mark.parametrize("mode", ["sliding", "rolling"])
def test_score_texts_documents_and_corpus(models, tokenizer, mode):
    model = models["gpt2"]
    texts = [" ".join(corpus(n, seed=20 + n)) for n in (1, 3, 5)] + ["über ✓ 東京 café"]
    out = score_texts(model, tokenizer, texts, window=24, mode=mode, batch_size=4)
    assert len(out.documents) == len(texts)
    total_nll, total_tokens, num_bytes, num_words = 0.0, 0, 0, 0
    for text, doc in zip(texts, out.documents):
        ids = torch.tensor(tokenizer(text)["input_ids"])
        assert torch.equal(doc.token_ids, ids)
        alone = score_model(model, ids, window=24, mode=mode)
        assert_nll_close(doc.token_nll, alone.token_nll, rtol=RTOL)
        assert doc.num_tokens == alone.num_tokens == len(ids) - (mode == "sliding")
        # the text the scored tokens cover: all of it in rolling mode (lm-evaluation-harness's
        # counts), all but the first token's in sliding mode (one word less)
        first = tokenizer(text, return_offsets_mapping=True)["offset_mapping"][0][1]
        unscored = 0 if mode == "rolling" else len(text[:first].encode("utf-8"))
        assert doc.num_bytes == len(text.encode("utf-8")) - unscored
        assert doc.num_words == len(text.split()) - (mode == "sliding")
        assert doc.mean_nll == pytest.approx(alone.mean_nll, rel=1e-6)
        total_nll += doc.sum_nll
        total_tokens += doc.num_tokens
        num_bytes, num_words = num_bytes + doc.num_bytes, num_words + doc.num_words
    corpus_res = out.corpus
    assert corpus_res.num_tokens == total_tokens and corpus_res.num_bytes == num_bytes
    assert corpus_res.mean_nll == pytest.approx(total_nll / total_tokens, rel=1e-9)
    assert corpus_res.bits_per_byte == pytest.approx(total_nll / num_bytes / math.log(2), rel=1e-9)
    assert corpus_res.word_perplexity == pytest.approx(math.exp(total_nll / num_words), rel=1e-9)
    with pytest.raises(ValueError, match="nothing to score"):
        score_texts(model, tokenizer, [""])


@pytest.mark.parametrize("kind", ["gpt2", "gemma2"])
def test_score_model_and_texts_stats(models, tokenizer, kind):
    """``stats=True``: a TokenStats per token against the float64 oracle on the model's own
    logits (Gemma 2: soft-capped), aligned like ``token_nll``, and the summary figures."""
    model = models[kind]
    ids = encode(tokenizer, seed=3, lines=3)[:60]
    with torch.no_grad():  # every third token the model's own guess, so top-1 accuracy is not 0
        for t in range(2, len(ids), 3):
            ids[t] = model(ids[None, :t]).logits[0, -1].argmax()
    res = score_model(model, ids, stats=True, top_k=3)
    plain = score_model(model, ids)
    assert torch.equal(res.token_nll, plain.token_nll)
    st = res.stats
    assert st.entropy.shape == ids.shape and st.top_k_ids.shape == (*ids.shape, 3)
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
    expected = pplfast.reference.token_stats(logits[:-1], ids[1:], top_k=3)
    lse = torch.logsumexp(logits[:-1].double(), -1)
    assert_nll_close(st.entropy[1:], expected.entropy.float(), lse, rtol=RTOL, what="entropy")
    assert_nll_close(st.max_logprob[1:], expected.max_logprob.float(), lse, rtol=RTOL,
                     what="max_logprob")
    assert torch.equal(st.argmax[1:], expected.argmax) and torch.equal(st.rank[1:], expected.rank)
    assert torch.equal(st.top_k_ids[1:], expected.top_k_ids)
    assert int(st.argmax[0]) == -1 and float(st.entropy[0]) == 0.0  # the unscored first token
    assert bool(res.scored[1:].all())
    assert res.mean_entropy == pytest.approx(expected.entropy.mean().item(), rel=RTOL)
    top1 = (expected.argmax == ids[1:]).double().mean().item()
    assert top1 >= 19 / 59
    assert res.top1_accuracy == pytest.approx(top1, abs=1e-12)

    texts = ["the quick brown fox jumps", "river stone light über café"]
    out = score_texts(model, tokenizer, texts, stats=True, top_k=2)
    entropies, hits, n = [], 0, 0
    for doc in out.documents:
        assert torch.equal(doc.stats.nll, doc.token_nll)
        assert doc.stats.top_k_ids.shape == (len(doc.token_ids), 2)
        entropies.append(doc.stats.entropy[doc.scored])
        hits += int((doc.stats.argmax == doc.token_ids)[doc.scored].sum())
        n += int(doc.scored.sum())
    assert out.corpus.mean_entropy == pytest.approx(torch.cat(entropies).double().mean().item(),
                                                    rel=1e-6)
    assert out.corpus.top1_accuracy == pytest.approx(hits / n, abs=1e-12)
    assert score_texts(model, tokenizer, texts).corpus.mean_entropy is None
    with pytest.raises(ValueError, match="top_k"):
        score_model(model, ids, top_k=2)  # top_k without stats
    with pytest.raises(ValueError, match="top_k"):
        score_model(model, ids, stats=True, top_k=65)


def test_bfloat16_model_no_worse_than_its_own_loss(models, tokenizer):
    """Three-way rule: error against a float64 head on the same bf16 hidden states is no larger
    than that of the model's own bf16 logits + float32 cross-entropy."""
    import copy

    model = copy.deepcopy(models["llama"]).to(torch.bfloat16)
    ids = encode(tokenizer, seed=12)[:64]
    res = score_model(model, ids)
    with torch.no_grad():
        hidden = model.model(ids.unsqueeze(0)).last_hidden_state[0]
        weight = model.get_output_embeddings().weight
        truth = F.cross_entropy(F.linear(hidden.double(), weight.double())[:-1], ids[1:],
                                reduction="none")
        own = F.cross_entropy(model(ids.unsqueeze(0)).logits[0, :-1].float(), ids[1:],
                              reduction="none").double()
    ours_err = (res.token_nll[1:].double() - truth).abs()
    own_err = (own - truth).abs()
    assert own_err.max() > 1e-3  # control: bf16 logits really are rounded
    assert ours_err.max() <= own_err.max() + 1e-5 and ours_err.mean() <= own_err.mean()


def test_score_model_checks_targets_on_the_cpu_not_in_the_op(models, tokenizer, monkeypatch):
    from pplfast.models import score as score_module

    calls = []
    for name in ("linear_token_nll", "token_nll", "linear_token_stats", "token_stats"):
        original = getattr(score_module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, kwargs.get("check_targets", True)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(score_module, name, spy)
    ids = encode(tokenizer, seed=13)[:40]
    score_model(models["llama"], torch.stack([ids, ids]), window=16, stride=8, batch_size=2)
    assert calls and all(call == ("linear_token_nll", False) for call in calls), calls
    calls.clear()
    score_model(LogitsOnly(models["llama"]), ids, window=16, stride=8)
    assert calls and all(call == ("token_nll", False) for call in calls), calls
    calls.clear()  # the statistics path skips the check too
    score_model(models["llama"], torch.stack([ids, ids]), window=16, stride=8, batch_size=2,
                stats=True, top_k=2)
    assert calls and all(call == ("linear_token_stats", False) for call in calls), calls
    calls.clear()
    score_model(LogitsOnly(models["llama"]), ids, window=16, stride=8, stats=True)
    assert calls and all(call == ("token_stats", False) for call in calls), calls
    bad = ids.clone()
    bad[5] = len(tokenizer)
    with pytest.raises(ValueError, match=re.escape(f"input_ids[5] = {len(tokenizer)} is outside")):
        score_model(models["llama"], bad)  # the up-front check, in input_ids' own indexing
    # past the up-front check (a model whose vocabulary is unknown, or a caller that skips it),
    # a token that is only ever a target is still caught, on the CPU, before any kernel
    monkeypatch.setattr(score_module, "check_ids", lambda *args: None)
    bad = ids.clone()
    bad[-1] = len(tokenizer)
    with pytest.raises(ValueError, match=f"= {len(tokenizer)} is outside"):
        score_model(models["llama"], bad)
    with pytest.raises(ValueError, match=f"= {len(tokenizer)} is outside"):
        score_model(LogitsOnly(models["llama"]), bad)
    for model in (models["llama"], LogitsOnly(models["llama"])):
        with pytest.raises(ValueError, match=f"= {len(tokenizer)} is outside"):
            score_model(model, bad, stats=True)


def text_of_tokens(tokenizer, n, seed=0):
    """A text that the tokenizer turns into exactly ``n`` tokens (without special tokens)."""
    rng = random.Random(seed)
    words = []
    while True:
        words.append(rng.choice(WORDS))
        count = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
        if count == n:
            return " ".join(words)
        if count > n:
            words = words[:-1]


@pytest.mark.parametrize("mode,window", [("rolling", 4), ("sliding", 4), ("chunks", 3),
                                         ("rolling", None)])
def test_num_windows_counts_the_windows_that_ran(models, tokenizer, mode, window, monkeypatch):
    """Documents of 8, 12 and 5 tokens with window=4 in rolling mode run 2 + 3 + 2 = 7 windows
    (each holds the prefix token and at most 3 document tokens as input, predicting 4)."""
    from pplfast.models import runner

    texts = [text_of_tokens(tokenizer, n, seed=n) for n in (8, 12, 5)]
    ran = []
    inputs = runner.window_inputs
    monkeypatch.setattr(runner, "window_inputs",
                        lambda streams, batch, *a: ran.extend(batch) or inputs(streams, batch, *a))
    out = score_texts(models["gpt2"], tokenizer, texts, window=window, mode=mode, batch_size=2)
    assert out.num_windows == len(ran)
    if (mode, window) == ("rolling", 4):
        assert out.num_windows == 7


def test_scored_text_counts_by_hand():
    """Token i covers the text from the end of token i-1 to its own end (the last token to the
    text's end); a word counts with the token where it starts (lm-evaluation-harness's words:
    ``re.split(r"\\s+", text)``, so leading and trailing whitespace start an empty word)."""
    from pplfast.models.text import Tokens, scored_text_counts

    def counts(text, ends, scored):
        tokens = Tokens(torch.zeros(len(ends), dtype=torch.long), torch.tensor(ends))
        return scored_text_counts(text, tokens, torch.tensor(scored))

    text = "ab  cd\tü e"  # 10 characters, 11 bytes, 4 words starting at 0, 4, 7 and 9
    ends = [2, 6, 8, 10]  # "ab", "  cd", "\tü", " e"
    assert counts(text, ends, [False, True, False, True]) == (6, 2)
    assert counts(text, ends, [True, False, True, False]) == (5, 2)
    assert counts(text, ends, [True] * 4) == (11, 4)
    assert counts(text, ends, [False] * 4) == (0, 0)
    # a special token first (offsets (0, 0)) covers nothing; one that ends short of the text
    # leaves the rest to the last token
    assert counts(text, [0, 2, 6, 8, 9], [False, True, False, False, True]) == (4, 2)
    assert counts(" ab ", [3, 4], [True, False]) == (3, 2)  # "", "ab" start in " ab"
    assert counts(" ab ", [3, 4], [False, True]) == (1, 1)  # the empty word after the space
    assert counts("", [], []) == (0, 1)  # as lm-evaluation-harness: one (empty) word


@pytest.mark.parametrize("text", [
    "the quick  brown fox\n\njumps über 東京 ✓ café ", "  naïve\tkernel ✓✓ 東京東京 day",
    "one two three four five six seven eight nine ten"])
def test_scored_text_counts_add_up_to_lm_eval(tokenizer, text):
    """The scored and unscored tokens' counts add up to the whole text's, lm-evaluation-harness's
    ``len(text.encode())`` and ``len(re.split(r"\\s+", text))``, for any split; the decoding
    fallback (tokenizers without offsets) gives the offsets' counts on a byte-level BPE."""
    from pplfast.models.text import Tokens, count_words, scored_text_counts, tokenize

    for special in (False, True):
        tokens = tokenize(tokenizer, text, add_special_tokens=special)
        assert tokens.ends is not None and len(tokens.ends) == len(tokens.ids)
        rng = random.Random(len(text))
        for _ in range(20):
            scored = torch.tensor([rng.random() < 0.5 for _ in tokens.ids])
            a = scored_text_counts(text, tokens, scored)
            b = scored_text_counts(text, tokens, ~scored)
            assert (a[0] + b[0], a[1] + b[1]) == (len(text.encode("utf-8")), count_words(text))
            assert count_words(text) == len(re.split(r"\s+", text))
            if text.isascii():
                assert scored_text_counts(text, Tokens(tokens.ids, None), scored, tokenizer) == a


def test_packing_stays_within_batch_tokens():
    from pplfast.models.runner import pack_jobs
    from pplfast.windows import make_windows

    rng = random.Random(3)
    schedules = [make_windows(rng.randint(0, 300), window=64, stride=40) for _ in range(40)]
    jobs = [(i, w) for i, s in enumerate(schedules) for w in s]
    for batch_tokens in (64, 100, 1000):
        batches = pack_jobs(jobs, None, batch_tokens)
        key = lambda j: (j[0], j[1].start)  # noqa: E731
        assert sorted((j for b in batches for j in b), key=key) == sorted(jobs, key=key)  # each once
        for b in batches:
            longest = max(w.input_length for _, w in b)
            assert len(b) * longest <= batch_tokens or len(b) == 1
        lengths = [w.input_length for b in batches for _, w in b]
        assert lengths == sorted(lengths, reverse=True)
    # control: a window longer than batch_tokens still runs, alone
    assert [len(b) for b in pack_jobs(jobs, None, 10)] == [1] * len(jobs)
    assert max(len(b) for b in pack_jobs(jobs, 3, 10 ** 6)) == 3
