"""`pplfast compare` and `pplfast score` in llamacpp mode: BOS first in every chunk when the
tokenizer adds one, and the bytes and words of the scored half (the schedule itself:
tests/models/test_llamacpp_mode.py)."""
import json
import math

import pytest
import torch

import pplfast
from builders import (ascii_text, build_model, corpus, covered,
                      llamacpp_case, llamacpp_loop, train_tokenizer)
from pplfast.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup():
    return llamacpp_case()


def test_compare_cli_puts_bos_first_when_the_tokenizer_adds_it(setup, tmp_path, capsys):
    """pplfast compare --mode llamacpp: BOS first in every chunk, as pplfast score (score_texts)
    does with a tokenizer that adds BOS."""
    from tokenizers import processors

    model, _, _ = setup
    bos_tok = train_tokenizer()
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.convert_tokens_to_ids("<s>"))])
    test = build_model("llama", len(bos_tok), context=64, seed=1)
    for name, m in (("base", model), ("test", test)):
        m.save_pretrained(tmp_path / name)
        bos_tok.save_pretrained(tmp_path / name)
    text = " ".join(corpus(30, seed=5))
    (tmp_path / "doc.txt").write_text(text)
    rc = main(["compare", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "test"),
               "--input", str(tmp_path / "doc.txt"), "--mode", "llamacpp", "--window", "32",
               "--json", "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    figures = json.loads(out)
    ids = torch.tensor(bos_tok(text)["input_ids"])
    for key, m in (("perplexity_base", model), ("perplexity_test", test)):
        want = llamacpp_loop(m, ids, 32, bos_tok.bos_token_id)
        assert figures["num_tokens"] == len(want)
        assert figures[key] == pytest.approx(math.exp(sum(want) / len(want)), rel=1e-5)
        scored = pplfast.score_texts(m, bos_tok, [text], window=32, mode="llamacpp").corpus
        assert figures[key] == pytest.approx(scored.perplexity, rel=1e-5)
    # without BOS in the chunks the figure would differ
    plain = llamacpp_loop(model, ids, 32, None)
    assert figures["perplexity_base"] != pytest.approx(math.exp(sum(plain) / len(plain)), rel=1e-5)


def test_score_command_counts_the_scored_bytes(setup, tmp_path, capsys):
    model, tokenizer, _ = setup
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    text = ascii_text(3)
    (tmp_path / "doc.txt").write_text(text)
    rc = main(["score", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "doc.txt"),
               "--mode", "llamacpp", "--window", "32", "--json", "--no-progress",
               "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    figures = json.loads(out)
    doc = pplfast.score_texts(model, tokenizer, [text], window=32, mode="llamacpp").documents[0]
    num_bytes, num_words = covered(tokenizer, doc.token_ids, doc.scored)
    assert figures["num_bytes"] == num_bytes
    assert figures["bits_per_byte"] == pytest.approx(doc.sum_nll / num_bytes / math.log(2), rel=1e-6)
    assert figures["word_perplexity"] == pytest.approx(math.exp(doc.sum_nll / num_words), rel=1e-6)
