"""CorpusScorer against score_model per document; packing, order, empty documents, pickling;
run figures and outliers; the corpus readers and append-safe writers."""
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from pplfast import CorpusScorer, score_model, score_texts
from pplfast.corpus import ModelLoadError, RunStats, robust_z
from pplfast.corpus.ids import IdIndex
from pplfast.corpus.io import CorpusIOError, expand_inputs, iter_documents, iter_score_rows
from pplfast.corpus.writer import RowAppender, repair_tail
from builders import build_model, corpus, train_tokenizer

pytest.importorskip("transformers")

RTOL = 1e-5  # padded, packed passes against one document at a time (see test_score_model.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-model")
    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=48)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root, model, tokenizer


def texts_of(count, seed):
    rng = random.Random(seed)
    return [" ".join(corpus(rng.randint(1, 9), seed=seed * 100 + i)) for i in range(count)]


def expected_sums(model, tokenizer, text, *, window, mode):
    ids = torch.tensor(tokenizer(text, add_special_tokens=mode != "rolling")["input_ids"])
    res = score_model(model, ids, window=window, mode=mode, prefix_token_id=0)
    nll = res.token_nll.double()[res.scored]
    return res.num_tokens, float(nll.sum()), float((nll * nll).sum())


@pytest.mark.parametrize("mode,window,batch_tokens", [("sliding", 24, 100), ("rolling", 16, 64),
                                                      ("chunks", 20, 40), ("sliding", None, 4096)])
def test_sums_equal_score_model_and_order_is_kept(tiny, mode, window, batch_tokens):
    _, model, tokenizer = tiny
    texts = texts_of(11, seed=1) + ["naïve café ✓ 東京 über"]
    random.Random(2).shuffle(texts)
    scorer = CorpusScorer(model, tokenizer, window=window, mode=mode, batch_tokens=batch_tokens)
    batch = {"text": texts, "key": np.arange(len(texts)), "meta": [f"m{i}" for i in range(len(texts))]}
    out = scorer(batch)
    assert list(out["key"]) == list(range(len(texts))) and out["meta"] == batch["meta"]
    assert out["text"] is texts
    for i, text in enumerate(texts):
        n, total, squares = expected_sums(model, tokenizer, text, window=window or 48, mode=mode)
        assert out["num_tokens"][i] == n > 0
        assert out["sum_nll"][i] == pytest.approx(total, rel=RTOL)
        assert out["sum_nll_sq"][i] == pytest.approx(squares, rel=RTOL)
        # the bytes and words of the text the scored tokens cover, as score_texts counts them
        doc = score_texts(model, tokenizer, [text], window=window or 48, mode=mode,
                          prefix_token_id=0).documents[0]
        assert (out["num_bytes"][i], out["num_words"][i]) == (doc.num_bytes, doc.num_words)
        if mode == "rolling":  # every token scored: lm-evaluation-harness's counts
            assert (doc.num_bytes, doc.num_words) == (len(text.encode()), len(text.split()))
        else:
            assert doc.num_bytes < len(text.encode())
        assert out["perplexity"][i] == pytest.approx(math.exp(total / n), rel=RTOL)
        assert out["bits_per_byte"][i] == pytest.approx(total / doc.num_bytes / math.log(2), rel=RTOL)
    assert out["sum_nll"].dtype == np.float64 and out["num_tokens"].dtype == np.int64


def test_empty_documents_score_nothing_and_do_not_stop(tiny):
    _, model, tokenizer = tiny
    texts = ["", "   \n\t ", None, "hello", "the quick brown fox jumps over the lazy dog"]
    out = CorpusScorer(model, tokenizer, batch_tokens=64)({"text": texts})
    for i in range(3):
        assert out["num_tokens"][i] == 0 and out["sum_nll"][i] == 0
        assert math.isnan(out["perplexity"][i]) and math.isnan(out["bits_per_byte"][i])
    assert out["num_bytes"][1] == 6
    n, total, _ = expected_sums(model, tokenizer, texts[4], window=48, mode="sliding")
    assert out["num_tokens"][4] == n and out["sum_nll"][4] == pytest.approx(total, rel=RTOL)
    only_empty = CorpusScorer(model, tokenizer)({"text": ["", " "]})
    assert list(only_empty["num_tokens"]) == [0, 0]


def test_pickle_reloads_from_the_directory(tiny):
    import transformers

    root, model, tokenizer = tiny
    loaded = transformers.AutoModelForCausalLM.from_pretrained(root).eval()
    scorer = CorpusScorer(loaded, window=32, batch_tokens=128)
    texts = texts_of(5, seed=4)
    direct = scorer({"text": texts})
    blob = pickle.dumps(scorer)
    weights = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert len(blob) < weights / 4  # the model did not travel
    clone = pickle.loads(blob)
    assert clone._model is None
    again = clone({"text": texts})
    np.testing.assert_array_equal(again["num_tokens"], direct["num_tokens"])
    np.testing.assert_allclose(again["sum_nll"], direct["sum_nll"], rtol=1e-12)
    by_path = CorpusScorer(str(root), window=32, batch_tokens=128)
    assert by_path._model is None  # lazy: nothing loaded before the first batch
    np.testing.assert_allclose(pickle.loads(pickle.dumps(by_path))({"text": texts})["sum_nll"],
                               direct["sum_nll"], rtol=1e-12)
    with pytest.raises(TypeError, match="no name_or_path"):
        pickle.dumps(CorpusScorer(model, tokenizer))  # built from a config: nothing to reload


def test_bad_options_and_batches(tiny, tmp_path):
    _, model, tokenizer = tiny
    with pytest.raises(ValueError, match="mode must be one of"):
        CorpusScorer(model, tokenizer, mode="bogus")
    with pytest.raises(ValueError, match="batch_tokens must be a positive int, got 0"):
        CorpusScorer(model, tokenizer, batch_tokens=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        CorpusScorer(model, tokenizer, backend="nope")
    with pytest.raises(ValueError, match="stride applies to mode='sliding'"):
        CorpusScorer(model, tokenizer, mode="chunks", stride=3)
    with pytest.raises(TypeError, match="model must be"):
        CorpusScorer(3.0)
    with pytest.raises(ValueError, match="needs tokenizer="):
        CorpusScorer(model)
    scorer = CorpusScorer(model, tokenizer, text_field="body")
    with pytest.raises(ValueError, match="no column 'body'"):
        scorer({"text": ["a"]})
    with pytest.raises(TypeError, match="document 1 must be a string, got int"):
        scorer({"body": ["a", 7]})
    with pytest.raises(ValueError, match="column 'x' has 1 rows"):
        scorer({"body": ["a", "b"], "x": [1]})
    # a missing directory is named as such, not as transformers' "Repo id must be ..."
    with pytest.raises(ModelLoadError, match="model directory '.*' does not exist"):
        CorpusScorer(str(tmp_path / "no-model")).model
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        CorpusScorer(str(tmp_path / "empty")).tokenizer


def test_robust_z_and_run_figures():
    stats = RunStats()
    rng = np.random.default_rng(0)
    mean_nll = rng.normal(2.0, 0.1, 200)
    tokens = rng.integers(5, 50, 200)
    for n, m in zip(tokens, mean_nll):
        stats.add(int(n), float(n * m), int(4 * n))
    stats.add(0, 0.0, 10)  # an empty document: counted, never scored
    median, sd = stats.center()
    assert median == pytest.approx(np.median(mean_nll))
    assert sd == pytest.approx(1.4826 * np.median(np.abs(mean_nll - np.median(mean_nll))))
    z = stats.z_scores([10, 10, 0], [10 * median, 10 * (median + 4 * sd), 0.0])
    assert z[0] == 0 and z[1] == pytest.approx(4.0) and math.isnan(z[2])
    summary = stats.summary(num_outliers=0, outliers=[], seconds=2.0, documents=201, tokens=10)
    assert summary["num_documents"] == 201 and summary["num_scored_documents"] == 200
    assert summary["num_tokens"] == int(tokens.sum())
    assert summary["perplexity"] == pytest.approx(math.exp((tokens * mean_nll).sum() / tokens.sum()))
    assert summary["bits_per_byte"] == pytest.approx((tokens * mean_nll).sum() / (4 * tokens.sum()) / math.log(2))
    assert summary["perplexity_percentiles"]["50"] == pytest.approx(np.percentile(np.exp(mean_nll), 50))
    assert summary["documents_per_second"] == pytest.approx(100.5)
    # no spread: a document off the median is infinitely far, one on it is not
    assert list(robust_z([1, 1, 1], [2.0, 2.0, 3.0], 2.0, 0.0)) == [0.0, 0.0, math.inf]


# ---------------------------------------------------------------- readers and writers

def test_expand_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/sub/a.jsonl", "d/skip.csv", "d/.hidden.txt", "x.jsonl"):
        (tmp_path / name).write_text('{"text": "t"}\n' if name.endswith("jsonl") else "t")
    d = str(tmp_path / "d")
    assert expand_inputs([d]) == [os.path.join(d, "b.txt"), os.path.join(d, "sub", "a.jsonl")]
    both = expand_inputs([str(tmp_path / "x.jsonl"), str(tmp_path / "*.jsonl"), d])
    assert len(both) == 3  # the file named twice is read once
    for bad, match in ((tmp_path / "none.jsonl", "does not exist"), (tmp_path / "d" / "skip.csv", "unsupported"),
                       (tmp_path / "*.nothing", "matches no")):
        with pytest.raises(CorpusIOError, match=match):
            expand_inputs([str(bad)])


def test_documents_ids_and_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "k": 5}\n\n{"text": null, "k": "x"}\n', encoding="utf-8")
    docs = list(iter_documents([str(path)]))
    assert [(d.id, d.text) for d in docs] == [(f"{path}:1", "a"), (f"{path}:3", "")]
    assert [d.id for d in iter_documents([str(path)], id_field="k")] == ["5", "x"]
    for content, match in (('{"text": "a"}\n{bad\n', r"c.jsonl:2: not valid JSON"),
                           ('{"body": "a"}\n', "no string field 'text'"), ("[1]\n", "not a JSON object")):
        path.write_text(content)
        with pytest.raises(CorpusIOError, match=match):
            list(iter_documents([str(path)]))
    path.write_text('{"text": "a"}\n')
    with pytest.raises(CorpusIOError, match="no string or integer field 'id'"):
        list(iter_documents([str(path)], id_field="id"))


def test_id_index_merges_runs(monkeypatch):
    monkeypatch.setattr(IdIndex, "_RUN", 3)
    index = IdIndex()
    ids = [f"doc-{i}" for i in range(50)]
    assert all(index.add(i) for i in ids)
    assert len(index) == 50 and len(index._recent) < 3 and 1 < len(index._runs) <= 6
    assert all(i in index for i in ids) and "doc-50" not in index
    assert not any(index.add(i) for i in ids[::7]) and len(index) == 50


def test_appender_keeps_whole_lines_and_torn_tail_is_cut(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    writer = RowAppender(path)
    for i in range(5):
        writer.write({"id": f"r{i}", "perplexity": math.nan if i == 2 else float(i)})
    writer.close()
    with open(path, "a") as f:
        f.write('{"id": "r5", "perpl')  # a write cut short by a kill
    rows = list(iter_score_rows(path))  # the torn line is not a row
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)] and math.isnan(rows[2]["perplexity"])
    repair_tail(path)
    with open(path) as f:
        assert f.read().endswith('"perplexity": 4.0}\n')
    writer = RowAppender(path)
    writer.write({"id": "r5", "perplexity": 5.0})
    writer.close()
    assert [r["id"] for r in iter_score_rows(path)] == [f"r{i}" for i in range(6)]


def test_run_figures_past_exp_range_are_inf():
    """A mean NLL past exp's range (710 nats): perplexity and its percentiles are inf, as the
    metric reports them, not an OverflowError (nor NaN percentiles from inf - inf)."""
    import warnings

    stats = RunStats()
    stats.add_arrays([10] * 5, [5000.0, 8000.0, 9000.0, 20000.0, 20.0], [40] * 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = stats.summary(num_outliers=0, outliers=[], seconds=1.0, documents=5, tokens=50)
    assert summary["perplexity"] == math.inf  # exp(840.4)
    assert summary["bits_per_byte"] == pytest.approx(42020 / 200 / math.log(2))
    # document perplexities e^2, e^500, inf, inf, inf
    pct = summary["perplexity_percentiles"]
    assert pct["1"] == pytest.approx(math.exp(2) + 0.04 * (math.exp(500) - math.exp(2)), rel=1e-12)
    assert pct["25"] == math.exp(500)  # on an order statistic: inf beside it does not count
    assert all(pct[p] == math.inf for p in ("50", "90", "99"))
    # finite values: numpy's linear percentile of the perplexities
    finite = RunStats()
    finite.add_arrays([4, 5, 6, 7, 8], [4.0, 7.5, 3.0, 14.0, 4.0], [1] * 5)
    want = np.percentile(np.exp([1.0, 1.5, 0.5, 2.0, 0.5]), [1, 5, 10, 25, 50, 75, 90, 95, 99])
    got = finite.summary(num_outliers=0, outliers=[], seconds=1.0, documents=5, tokens=30)
    assert list(got["perplexity_percentiles"].values()) == pytest.approx(list(want), rel=1e-12)


def test_token_ids_past_the_models_vocabulary_are_named_before_any_pass(tiny):
    """A tokenizer larger than the model's vocabulary: the document and position of the first id
    outside it, as a ValueError before any pass (an id that is only ever an input, a document's
    first token, would otherwise reach the embedding and fail there)."""
    _, _, tokenizer = tiny
    small = build_model("llama", 300, context=48)
    texts = ["the a model", "kernel the a"]  # "kernel" is token 302 of the 320
    assert tokenizer(texts[1])["input_ids"][0] == 302
    with pytest.raises(ValueError, match=r"^document 1 token ids\[0\] = 302 is outside the "
                                         r"model's vocabulary \[0, 300\)$"):
        CorpusScorer(small, tokenizer, window=16)({"text": texts})
