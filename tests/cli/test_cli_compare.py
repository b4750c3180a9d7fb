"""`pplfast compare` end to end on tiny models saved to disk: the figures of compare_models,
--json, --per-token, --plot, the llama.cpp-style table, one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

import pplfast
from builders import build_model, corpus, rounded_copy, train_tokenizer
from pplfast.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def pair(tokenizer):
    base = build_model("llama", len(tokenizer), context=64)
    return base, rounded_copy(base)


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


@pytest.mark.parametrize("case", ["missing-base", "other-tokenizer", "bad-window",
                                  "bad-device-base"])
def test_cli_errors_one_line(saved, capsys, case):
    root, _ = saved
    args = {"missing-base": ["--base", root / "nope", "--model", root / "test"],
            "other-tokenizer": ["--base", root / "base", "--model", root / "other"],
            "bad-window": ["--base", root / "base", "--model", root / "test", "--window", 500],
            "bad-device-base": ["--base", root / "base", "--model", root / "test",
                                "--device-base", "bogus"],
            }[case]
    rc, out, err = run_cli(capsys, *args, "--input", root / "docs.jsonl", "--no-progress")
    assert rc == 1 and out == ""
    assert err.startswith("pplfast compare: error: ") and err.count("\n") == 1, err
    expected = {"missing-base": "does not exist", "other-tokenizer": "tokenizers",
                "bad-window": "longer than the context length",
                "bad-device-base": "bad --device-base 'bogus'"}[case]
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
