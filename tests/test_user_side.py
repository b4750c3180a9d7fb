"""The user's side: one clear line for every mistake, no lost work, outputs people can read.

CLI cases run through ``pplfast.cli.main`` (exit code, one line on stderr, no traceback) and, where
the process itself matters (Ctrl-C, the console script), through a subprocess.
"""
import gzip
import json
import math
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pplfast
import pplfast.reference
from pplfast.cli import main
from pplfast.score import atomic_open, human, input_format, read_documents, token_text, ScoreError
from test_hf import build_model, corpus, train_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ux")
    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=48)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    texts = [" ".join(corpus(n, seed=40 + n)) for n in (2, 5)] + ["naïve café ✓ 東京"]
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    (root / "docs.jsonl").write_text(lines, encoding="utf-8")
    return root, model, tokenizer, texts, lines


def run_cli(capsys, *argv):
    rc = main(["score", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 1 and out == "", (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pplfast score: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- input formats: never a JSON-lines file scored as raw text ---------------------------------

@pytest.mark.parametrize("name", ["docs.jsonl", "DOCS.JSONL", "docs.json", "docs.jsonl.gz",
                                  "docs.Json.GZ"])
def test_json_lines_detected_whatever_the_case_or_compression(saved, tmp_path, name):
    texts, lines = saved[3], saved[4]
    path = tmp_path / name
    data = lines.encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.lower().endswith(".gz") else data)
    assert input_format(str(path)) == "jsonl"
    assert read_documents(str(path)) == texts


def test_json_array_and_txt_and_explicit_format(saved, tmp_path):
    texts = saved[3]
    arr = tmp_path / "docs.json"
    arr.write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    assert read_documents(str(arr)) == texts
    txt = tmp_path / "book.TXT"
    txt.write_text(texts[0], encoding="utf-8")
    assert read_documents(str(txt)) == [texts[0]]
    odd = tmp_path / "corpus.data"
    odd.write_text(saved[4], encoding="utf-8")
    assert read_documents(str(odd), fmt="jsonl") == texts
    assert read_documents(str(odd), fmt="txt") == [saved[4]]


def test_unknown_extension_is_refused(saved, tmp_path, capsys):
    odd = tmp_path / "corpus.csv"
    odd.write_text("text\nhello\n")
    with pytest.raises(ScoreError, match="--format txt|jsonl"):
        input_format(str(odd))
    rc, out, err = run_cli(capsys, "--model", saved[0] / "model", "--input", odd, "--no-progress")
    assert_one_line_error(rc, out, err, "corpus.csv", "--format")


# ---- the API: clear errors for values that would give a wrong number ---------------------------

@pytest.mark.parametrize("option,value", [("softcap", 1e39), ("softcap", 1e300),
                                          ("temperature", 1e39), ("temperature", 1e-300)])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_scale_outside_float32_range_is_refused(option, value, path):
    logits, targets = torch.randn(3, 11), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=f"{option} must lie in"):
        if path == "logits":
            pplfast.token_nll(logits, targets, **{option: value})
        else:
            pplfast.linear_token_nll(torch.randn(3, 4), torch.randn(11, 4), targets,
                                     **{option: value})


@pytest.mark.parametrize("box", [np.float32, np.float64, lambda v: torch.tensor(v)])
def test_numpy_scalars_and_0d_tensors_accepted(box):
    logits, targets = torch.randn(4, 13), torch.tensor([1, 2, -1, 3])
    want = pplfast.token_nll(logits, targets, ignore_index=-1, softcap=5.0, temperature=0.5)
    got = pplfast.token_nll(logits, targets, ignore_index=np.int64(-1) if box is not np.float32
                            else torch.tensor(-1), softcap=box(5.0), temperature=box(0.5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(ignore_index=2 ** 63), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(temperature=torch.ones(2)), TypeError, "temperature must be a number"),
])
def test_option_messages(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        pplfast.token_nll(torch.randn(2, 5), torch.tensor([0, 1]), **kwargs)


def test_float64_refused_with_the_way_out():
    with pytest.raises(TypeError, match=r"logits is float64.*logits\.float\(\).*pplfast\.reference"):
        pplfast.token_nll(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))


def test_meta_tensors_with_auto_do_not_suggest_auto():
    with pytest.raises(ValueError, match="meta device") as info:
        pplfast.token_nll(torch.randn(2, 5, device="meta"), torch.tensor([0, 1], device="meta"))
    assert "auto" not in str(info.value)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_with_zero_width_hidden(backend, with_bias):
    targets = torch.tensor([[1, 2], [3, -100]])
    bias = torch.randn(10) if with_bias else None
    got = pplfast.linear_token_nll(torch.randn(2, 2, 0), torch.randn(10, 0), targets, bias=bias,
                                   softcap=2.0, backend=backend)
    logits = (bias if with_bias else torch.zeros(10)).expand(2, 2, 10)
    want = pplfast.reference.token_nll(logits, targets, softcap=2.0)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


def test_update_nll_names_the_dtype():
    with pytest.raises(TypeError, match="torch.int64"):
        pplfast.Perplexity().update_nll(torch.tensor([1, 2]))


def test_score_model_empty_and_bad_ids(saved):
    model = saved[1]
    for ids in (torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        res = pplfast.score_model(model, ids)
        assert res.num_tokens == 0 and math.isnan(res.perplexity)
        assert res.token_nll.shape == ids.shape and res.scored.shape == ids.shape
    ids = torch.randint(0, 300, (2, 20))
    ids[1, 17] = 5000
    with pytest.raises(ValueError, match=r"input_ids\[1, 17\] = 5000 is outside"):
        pplfast.score_model(model, ids)
    with pytest.raises(ValueError, match="longer than the model's context length 48"):
        pplfast.score_model(model, ids[:1, :10], window=64)


# ---- the CLI: one line, no traceback ------------------------------------------------------------

@pytest.mark.parametrize("case", ["window-past-context", "prefix-negative", "prefix-past-vocab",
                                  "device-meta", "device-bogus", "plot-txt", "json-dir-missing",
                                  "model-dir-missing", "model-dir-no-config", "nothing-to-score",
                                  "per-document-without-json"])
def test_cli_errors(saved, tmp_path, capsys, case):
    root = saved[0]
    model, inp = root / "model", root / "docs.jsonl"
    extra, needles = [], []
    if case == "window-past-context":
        extra, needles = ["--window", "64"], ["--window 64", "context length 48"]
    elif case == "prefix-negative":
        extra, needles = ["--mode", "rolling", "--prefix-token-id", "-3"], ["--prefix-token-id -3"]
    elif case == "prefix-past-vocab":
        extra, needles = ["--mode", "rolling", "--prefix-token-id", "99999"], ["vocabulary"]
    elif case == "device-meta":
        extra, needles = ["--device", "meta"], ["--device meta"]
    elif case == "device-bogus":
        extra, needles = ["--device", "tpu7"], ["--device 'tpu7'"]
    elif case == "plot-txt":
        extra, needles = ["--plot", tmp_path / "out.txt"], ["--plot", ".txt"]
    elif case == "json-dir-missing":
        extra, needles = ["--json", tmp_path / "nope" / "out.json"], ["--json", "does not exist"]
    elif case == "model-dir-missing":
        model, needles = tmp_path / "nope", ["model directory", "does not exist"]
    elif case == "model-dir-no-config":
        model = tmp_path / "empty-model"
        model.mkdir()
        needles = ["no config.json"]
    elif case == "nothing-to-score":
        inp = tmp_path / "tiny.jsonl"
        inp.write_text('{"text": "a"}\n{"text": "b"}\n')
        needles = ["nothing to score"]
    elif case == "per-document-without-json":
        extra, needles = ["--per-document"], ["--json"]
    start = time.perf_counter()
    rc, out, err = run_cli(capsys, "--model", model, "--input", inp, "--no-progress", *extra)
    assert_one_line_error(rc, out, err, *needles)
    assert "Perplexity.compute" not in err
    if case in ("plot-txt", "json-dir-missing"):
        assert time.perf_counter() - start < 5  # refused before the model was loaded


def test_unknown_flag_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["score", "--model", "m", "--input", "x.txt", "--frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pplfast score" in err and "--frobnicate" in err


def test_help_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pplfast {pplfast.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "score" in text and "bench" in text and "examples:" in text
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: sliding)" in text and "(default: 8)" in text
    assert "{auto,reference,cpu,triton,cuda}" in text


# ---- outputs ------------------------------------------------------------------------------------

def test_json_file_per_document_and_summary_first(saved, tmp_path, capsys):
    root, model, tokenizer, texts, _ = saved
    out_json = tmp_path / "figures.json"
    rc, out, err = run_cli(capsys, "--model", root / "model", "--input", root / "docs.jsonl",
                           "--window", 32, "--json", out_json, "--per-document", "--no-progress")
    assert rc == 0, err
    figures = json.loads(out_json.read_text())
    assert figures["pplfast_version"] == pplfast.__version__ and figures["backend"] == "cpu"
    assert figures["num_windows"] >= len(texts)
    docs = figures["documents"]
    assert len(docs) == len(texts)
    assert sum(d["num_tokens"] for d in docs) == figures["num_tokens"]
    assert sum(d["sum_nll"] for d in docs) == pytest.approx(figures["sum_nll"], rel=1e-9)
    assert not list(tmp_path.glob(".pplfast-*"))  # no temporary file left behind


def test_per_token_text_of_partial_characters(saved):
    tokenizer = saved[2]
    ids = tokenizer("東京 ✓", add_special_tokens=False)["input_ids"]
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial, "the test needs a token that is part of a multi-byte character"
    for i in partial:
        text = token_text(tokenizer, i)
        assert "\ufffd" not in text and "\\x" in text
    # the escaped pieces of one character spell its UTF-8 bytes
    spelled = b"".join(
        token_text(tokenizer, i).encode("latin-1", "backslashreplace").decode("unicode_escape")
        .encode("latin-1") if i in partial else token_text(tokenizer, i).encode("utf-8")
        for i in ids)
    assert spelled.decode("utf-8") == "東京 ✓"


def test_human_numbers():
    assert human(1215314534.5694) == "1.22e9"
    assert human(26.123456) == "26.1235"
    assert human(0.0001234) == "1.23e-4"
    assert human(123456) == "123,456"
    assert human(None) == "n/a" and human(float("inf")) == "inf"


def test_atomic_open_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("complete\n")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "complete\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_ctrl_c_exits_130_with_one_line_and_no_partial_file(saved, tmp_path):
    root = saved[0]
    big = tmp_path / "big.jsonl"
    text = " ".join(corpus(40, seed=3))
    big.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(400)))
    per_token = tmp_path / "tokens.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pplfast.cli", "score", "--model", str(root / "model"),
         "--input", str(big), "--window", "32", "--stride", "4", "--batch-size", "1",
         "--per-token", str(per_token)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # wait for the progress bar: imports and model load are done, scoring is under way
    seen, deadline = b"", time.monotonic() + 240
    while b"scoring" not in seen and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            seen += os.read(proc.stderr.fileno(), 4096)
    assert b"scoring" in seen, seen
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = (seen + err).decode("utf-8", "replace")
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1] == "pplfast: interrupted", err
    assert not per_token.exists() and not list(tmp_path.glob(".pplfast-*"))
