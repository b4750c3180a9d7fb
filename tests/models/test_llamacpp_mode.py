"""``mode="llamacpp"``: llama.cpp's perplexity schedule, against a loop written from its definition.

llama.cpp (``tools/perplexity/perplexity.cpp``): the text is tokenized once; ``len // n_ctx``
disjoint chunks of ``n_ctx`` tokens; each chunk's first input token becomes BOS when the
tokenizer adds one; the logits at positions ``n_ctx // 2 .. n_ctx - 2`` of a chunk score the
next token; the result is ``exp(mean nll)`` with ``±`` = ``ppl * sqrt(var(nll) / (n - 1))``.
The commands in llamacpp mode: tests/cli/test_cli_llamacpp.py.
"""
import math

import pytest
import torch

import pplfast
from builders import (ascii_text, build_model, corpus, covered,
                      llamacpp_case, llamacpp_loop, train_tokenizer)
from pplfast.windows import make_windows

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup():
    return llamacpp_case()


def test_schedule_indices():
    windows = make_windows(70, window=16, mode="llamacpp")
    assert len(windows) == 4  # 70 // 16; the tail of 6 tokens is dropped
    for k, w in enumerate(windows):
        assert (w.start, w.stop, w.score_start) == (16 * k, 16 * k + 16, 16 * k + 9)
        assert w.input_length == 15 and w.num_scored == 7
    with pytest.raises(ValueError, match="at least 2 \\* window = 32 tokens, got 31"):
        make_windows(31, window=16, mode="llamacpp")
    with pytest.raises(ValueError, match="needs a window"):
        make_windows(100, mode="llamacpp")


@pytest.mark.parametrize("bos", [None, 0])
def test_score_model_equals_the_loop(setup, bos):
    model, _, ids = setup
    n_ctx = 32
    want = llamacpp_loop(model, ids, n_ctx, bos)
    res = pplfast.score_model(model, ids, window=n_ctx, mode="llamacpp", prefix_token_id=bos,
                              batch_size=3)
    got = res.token_nll[res.scored].double()
    assert res.num_tokens == len(want) == (len(ids) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    mean = sum(want) / len(want)
    var = sum(x * x for x in want) / len(want) - mean * mean
    assert res.perplexity == pytest.approx(math.exp(mean), rel=1e-5)
    assert res.perplexity_stderr == pytest.approx(math.exp(mean) * math.sqrt(var / (len(want) - 1)),
                                                  rel=1e-4)


def test_bos_replacement_changes_the_score(setup):
    model, _, ids = setup
    plain = pplfast.score_model(model, ids, window=32, mode="llamacpp").perplexity
    with_bos = pplfast.score_model(model, ids, window=32, mode="llamacpp", prefix_token_id=0).perplexity
    assert plain != with_bos


def test_score_texts_uses_bos_when_the_tokenizer_adds_it(setup):
    from tokenizers import processors

    model, tokenizer, _ = setup
    text = " ".join(corpus(30, seed=5))
    bos_tok = train_tokenizer()
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.convert_tokens_to_ids("<s>"))])
    ids = torch.tensor(bos_tok(text)["input_ids"])
    assert int(ids[0]) == bos_tok.bos_token_id
    want = llamacpp_loop(model, ids, 32, bos_tok.bos_token_id)
    got = pplfast.score_texts(model, bos_tok, [text], window=32, mode="llamacpp").corpus
    assert got.num_tokens == len(want)
    assert got.mean_nll == pytest.approx(sum(want) / len(want), rel=1e-5)
    # a tokenizer without BOS: chunks keep their own first token
    plain = pplfast.score_texts(model, tokenizer, [text], window=32, mode="llamacpp").corpus
    ids = torch.tensor(tokenizer(text)["input_ids"])
    want = llamacpp_loop(model, ids, 32, None)
    assert plain.mean_nll == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_too_short_is_a_clear_error(setup):
    model, _, ids = setup
    with pytest.raises(ValueError, match="llamacpp"):
        pplfast.score_model(model, ids[:50], window=32, mode="llamacpp")


@pytest.mark.parametrize("bos", [None, 0])
def test_compare_models_scores_what_score_model_scores(setup, bos):
    """compare_models in llamacpp mode: the tokens score_model scores, from the same chunks
    (prefix_token_id first in each), each model's NLL that of the loop."""
    model, tokenizer, ids = setup
    test = build_model("llama", len(tokenizer), context=64, seed=1)
    res = pplfast.compare_models(model, test, ids, window=32, mode="llamacpp",
                                 prefix_token_id=bos, batch_size=3)
    for m, nll in ((model, res.token_comparison.nll_base), (test, res.token_comparison.nll_test)):
        want = pplfast.score_model(m, ids, window=32, mode="llamacpp", prefix_token_id=bos,
                                   batch_size=3)
        assert torch.equal(res.scored, want.scored)
        torch.testing.assert_close(nll, want.token_nll, rtol=0, atol=2e-5)
        loop = torch.tensor(llamacpp_loop(m, ids, 32, bos), dtype=torch.float64)
        torch.testing.assert_close(nll[res.scored].double(), loop, rtol=1e-4, atol=1e-4)
    assert res.num_tokens == (len(ids) // 32) * (32 - 1 - 32 // 2)


def test_bytes_and_words_are_those_of_the_scored_tokens(setup):
    """llama.cpp scores the second half of each chunk: bits per byte and word perplexity divide
    its NLL by the bytes and words of that half only (dividing by the whole text's made them
    about 2x and far too good)."""
    model, tokenizer, _ = setup
    texts = [ascii_text(1), ascii_text(2, words=150)]
    out = pplfast.score_texts(model, tokenizer, texts, window=32, mode="llamacpp")
    total_nll = total_bytes = total_words = 0
    for text, doc in zip(texts, out.documents):
        num_bytes, num_words = covered(tokenizer, doc.token_ids, doc.scored)
        assert (doc.num_bytes, doc.num_words) == (num_bytes, num_words)
        assert num_bytes < 0.6 * len(text.encode())  # the half of each chunk, roughly
        total_nll, total_bytes, total_words = (total_nll + doc.sum_nll, total_bytes + num_bytes,
                                               total_words + num_words)
    assert out.corpus.num_bytes == total_bytes and out.corpus.num_words == total_words
    assert out.corpus.bits_per_byte == pytest.approx(total_nll / total_bytes / math.log(2), rel=1e-9)
    assert out.corpus.word_perplexity == pytest.approx(math.exp(total_nll / total_words), rel=1e-9)

    # CorpusScorer's rows count the same bytes and words
    rows = pplfast.CorpusScorer(model, tokenizer, window=32, mode="llamacpp")({"text": texts})
    for i, doc in enumerate(out.documents):
        assert (rows["num_bytes"][i], rows["num_words"][i]) == (doc.num_bytes, doc.num_words)
        assert rows["bits_per_byte"][i] == pytest.approx(
            rows["sum_nll"][i] / doc.num_bytes / math.log(2), rel=1e-12)
