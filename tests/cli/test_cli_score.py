"""`pplfast score` end to end on a tiny model saved to disk: JSON, per-token file, plot, errors."""
import json
import os
import subprocess
import sys

import pytest

from pplfast import score_texts
from pplfast.cli import main
from builders import corpus, save_tiny_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    model, tokenizer = save_tiny_llama(root)
    texts = [" ".join(corpus(n, seed=30 + n)) for n in (2, 9, 4)] + ["naïve café ✓ 東京"]
    (root / "docs.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)),
        encoding="utf-8")
    (root / "doc.txt").write_text(texts[1], encoding="utf-8")
    return root, model, tokenizer, texts


def run_cli(capsys, *argv):
    rc = main(["score", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_per_token_and_plot(saved, capsys):
    root, model, tokenizer, texts = saved
    per_token, plot = root / "tokens.jsonl", root / "nll.png"
    rc, out, err = run_cli(capsys, "--model", root / "model", "--input", root / "docs.jsonl",
                           "--window", 32, "--stride", 8, "--batch-size", 3, "--json",
                           "--per-token", per_token, "--plot", plot, "--no-progress")
    assert rc == 0, err
    figures = json.loads(out)
    expected = score_texts(model, tokenizer, texts, window=32, stride=8)
    corpus_res = expected.corpus
    for key in ("perplexity", "mean_nll", "bits_per_byte", "perplexity_stderr", "word_perplexity"):
        assert figures[key] == pytest.approx(getattr(corpus_res, key), rel=1e-6), key
    assert figures["num_tokens"] == corpus_res.num_tokens
    assert figures["num_bytes"] == corpus_res.num_bytes < sum(len(t.encode("utf-8")) for t in texts)
    assert figures["num_documents"] == 4 and figures["tokens_per_second"] > 0
    assert (figures["mode"], figures["window"], figures["stride"]) == ("sliding", 32, 8)

    rows = [json.loads(line) for line in per_token.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == sum(len(d.token_ids) for d in expected.documents)
    for row in rows:
        doc = expected.documents[row["document"]]
        assert row["token_id"] == int(doc.token_ids[row["position"]])
        text = tokenizer.decode([row["token_id"]])
        if "\ufffd" not in text:
            assert row["token"] == text
        else:  # part of a multi-byte character: its bytes, escaped, never U+FFFD
            assert "\ufffd" not in row["token"] and "\\x" in row["token"]
        if doc.scored[row["position"]]:
            assert row["nll"] == pytest.approx(float(doc.token_nll[row["position"]]), rel=1e-6)
        else:
            assert row["nll"] is None and row["position"] == 0
    assert sum(r["nll"] for r in rows if r["nll"] is not None) == pytest.approx(corpus_res.sum_nll, rel=1e-6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_table_txt_rolling_default_window(saved, capsys):
    root, model, tokenizer, texts = saved
    rc, out, err = run_cli(capsys, "--model", root / "model", "--input", root / "doc.txt",
                           "--mode", "rolling", "--no-progress")
    assert rc == 0, err
    expected = score_texts(model, tokenizer, [texts[1]], window=48, mode="rolling").corpus
    lines = dict(line.split(None, 1) if "  " not in line else [s.strip() for s in line.split("  ", 1)]
                 for line in out.strip().splitlines())
    ppl, err_ = lines["perplexity"].split(" ± ")
    assert float(ppl) == pytest.approx(expected.perplexity, abs=1e-4)
    assert float(err_) == pytest.approx(expected.perplexity_stderr, abs=1e-4)
    assert int(lines["tokens scored"].replace(",", "")) == expected.num_tokens
    assert lines["windows"].startswith("rolling, window 48 (")
    assert lines["ran on"] == "backend cpu, float32 on cpu"
    assert "bits per byte" in lines and "tokens/s" in lines


def test_progress_bar_goes_to_stderr(saved, capsys):
    root = saved[0]
    rc, out, err = run_cli(capsys, "--model", root / "model", "--input", root / "doc.txt",
                           "--window", 16, "--json")
    assert rc == 0 and json.loads(out)["num_tokens"] > 0  # stdout stays pure JSON


@pytest.mark.parametrize("case", ["missing-model", "missing-input", "empty-input", "bad-jsonl",
                                  "no-field", "bad-utf8", "window-too-small",
                                  "stride-in-rolling", "unwritable-per-token"])
def test_errors_are_one_line(saved, capsys, tmp_path, case):
    root = saved[0]
    model, inp = root / "model", root / "doc.txt"
    extra = []
    if case == "missing-model":
        model = tmp_path / "no-such-model"
    elif case == "missing-input":
        inp = tmp_path / "absent.txt"
    elif case == "empty-input":
        inp = tmp_path / "empty.txt"
        inp.write_text("  \n\n")
    elif case == "bad-jsonl":
        inp = tmp_path / "bad.jsonl"
        inp.write_text('{"text": "ok"}\n{not json\n')
    elif case == "no-field":
        inp = tmp_path / "nofield.jsonl"
        inp.write_text('{"body": "hello"}\n')
    elif case == "bad-utf8":
        inp = tmp_path / "bin.txt"
        inp.write_bytes(b"\xff\xfe\x00bad")
    elif case == "window-too-small":
        extra = ["--window", "1"]
    elif case == "stride-in-rolling":
        extra = ["--mode", "rolling", "--stride", "2"]
    elif case == "unwritable-per-token":
        extra = ["--per-token", str(tmp_path / "no-such-dir" / "tokens.jsonl")]
    rc, out, err = run_cli(capsys, "--model", model, "--input", inp, "--no-progress", *extra)
    assert rc != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pplfast score: error: "), err
    assert "Traceback" not in err


def test_bad_choice_is_a_usage_error(saved, capsys):
    root = saved[0]
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "--model", root / "model", "--input", root / "doc.txt", "--backend", "nope")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pplfast score") and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pplfast score: error: argument --backend")


def test_console_script_missing_model_no_traceback(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text")
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast.cli", "score", "--model", str(tmp_path / "absent"),
         "--input", str(doc)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("pplfast score: error: model directory")
    assert "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---- --stats / --top-k (docs/ops.md "Token statistics") ----------------------------------------


def test_cli_score_stats(saved, capsys, tmp_path):
    """--stats adds the per-token statistics to the per-token file and mean entropy / top-1
    accuracy to the JSON and the table, equal to score_texts(..., stats=True)."""
    root, model, tokenizer, texts = saved
    per_token = tmp_path / "tokens.jsonl"
    argv = ["--model", root / "model", "--input", root / "docs.jsonl", "--window", 32,
            "--no-progress"]
    rc, out, err = run_cli(capsys, *argv, "--json", "--stats", "--top-k", 3,
                           "--per-token", per_token)
    assert rc == 0, err
    figures = json.loads(out)
    expected = score_texts(model, tokenizer, texts, window=32, stride=16, stats=True, top_k=3)
    assert expected.corpus.mean_entropy > 0
    assert figures["mean_entropy"] == pytest.approx(expected.corpus.mean_entropy, rel=1e-6)
    assert figures["top1_accuracy"] == pytest.approx(expected.corpus.top1_accuracy, abs=1e-12)
    rows = [json.loads(line) for line in per_token.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == sum(len(d.token_ids) for d in expected.documents)
    for row in rows:
        doc = expected.documents[row["document"]]
        p = row["position"]
        if not doc.scored[p]:
            assert row["entropy"] is None and row["top_k"] is None
            continue
        assert row["entropy"] == pytest.approx(float(doc.stats.entropy[p]), rel=1e-6)
        assert row["max_logprob"] == pytest.approx(float(doc.stats.max_logprob[p]), rel=1e-6)
        assert row["argmax"] == int(doc.stats.argmax[p]) and row["rank"] == int(doc.stats.rank[p])
        assert [t["id"] for t in row["top_k"]] == doc.stats.top_k_ids[p].tolist()
        assert row["top_k"][0]["token"] == tokenizer.decode([row["top_k"][0]["id"]]) or \
            "\\x" in row["top_k"][0]["token"]
        assert row["top_k"][0]["logprob"] == pytest.approx(row["max_logprob"], abs=1e-5)
    # the table gains two lines; without --stats the JSON carries nulls
    rc, out, err = run_cli(capsys, *argv, "--stats")
    assert rc == 0, err
    assert "mean entropy" in out and "top-1 accuracy" in out
    rc, out, err = run_cli(capsys, *argv, "--json")
    assert rc == 0, err
    plain = json.loads(out)
    assert plain["mean_entropy"] is None and plain["top1_accuracy"] is None
    rc, out, err = run_cli(capsys, *argv, "--top-k", 65)
    assert rc == 1 and "--top-k" in err
