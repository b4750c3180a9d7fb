"""`pplfast score-corpus` and `pplfast filter` end to end on a tiny trained Llama saved to disk.

Formats (.jsonl, .jsonl.gz, .txt folders, .parquet), the summary and outlier flags, resume after
SIGKILL and Ctrl-C, resume at 10 000 ids, --on-error skip, settings a resume must share, a second
run on one output, filter bands and joins, and one-line errors (flat memory as the corpus grows:
tests/memory/test_corpus_memory.py).
"""
import gzip
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from builders import (BAD_RECORDS, build_model, documents, save_trained_llama, train_tokenizer,
                      write_bad_corpus, write_jsonl)
from pplfast.corpus.writer import dump_row

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GARBLED_CHARS = "ŧ€¶ŋđ#%&*~^ßæðøþ§¤@{}|<>0123456789"
OPTS = ["--window", "32", "--batch-tokens", "256", "--no-progress"]
SUMMARY_KEYS = {"num_documents", "num_tokens", "perplexity", "bits_per_byte", "documents_per_second",
                "tokens_per_second", "perplexity_percentiles", "num_outliers", "outliers"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-corpus")
    model, tokenizer = save_trained_llama(root / "model")
    texts = documents(30, seed=1)
    rng = random.Random(5)
    garbled = "".join(rng.choice(GARBLED_CHARS) for _ in range(150))
    texts.insert(17, garbled)
    texts.insert(4, "   ")
    records = [{"text": t, "doc": f"d{i:02d}", "n": i} for i, t in enumerate(texts)]
    write_jsonl(root / "c.jsonl", records)
    write_jsonl(root / "c.jsonl.gz", records)
    (root / "txt" / "more").mkdir(parents=True)
    for i, t in enumerate(texts[:6]):
        sub = "more/" if i % 2 else ""
        (root / "txt" / f"{sub}doc{i}.txt").write_text(t, encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), root / "c.parquet", row_group_size=7)
    return root, model, tokenizer, texts, records


def run(capsys, *argv):
    from pplfast.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_rows(path):
    from pplfast.corpus.io import iter_score_rows

    return list(iter_score_rows(str(path)))


def expected_columns(model, tokenizer, texts):
    from pplfast import CorpusScorer

    return CorpusScorer(model, tokenizer, window=32).score_texts(texts)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "txt", "parquet"])
def test_formats_give_the_scorers_sums(saved, capsys, tmp_path, fmt):
    root, model, tokenizer, texts, _ = saved
    inp = root / ("txt" if fmt == "txt" else f"c.{fmt}")
    out = tmp_path / ("s.parquet" if fmt == "parquet" else "s.jsonl")
    rc, stdout, err = run(capsys, "score-corpus", "--model", root / "model", "--input", inp,
                          "--output", out, "--json", *OPTS)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert SUMMARY_KEYS <= set(summary)
    rows = read_rows(out)
    if fmt == "txt":
        names = sorted([f"doc{i}.txt" for i in range(0, 6, 2)]) + sorted(f"more/doc{i}.txt" for i in range(1, 6, 2))
        assert [r["id"] for r in rows] == [str(root / "txt" / n) for n in names]
        order = [int(n.split("doc")[1].split(".")[0]) for n in names]
        docs = [texts[i] for i in order]
    else:
        assert [r["id"] for r in rows] == [f"{inp}:{i + 1}" for i in range(len(texts))]
        docs = texts
    want = expected_columns(model, tokenizer, docs)
    for i, row in enumerate(rows):
        assert row["num_tokens"] == want["num_tokens"][i]
        assert row["num_bytes"] == want["num_bytes"][i] and row["num_words"] == want["num_words"][i]
        for key in ("sum_nll", "sum_nll_sq", "perplexity", "bits_per_byte"):
            if want["num_tokens"][i] == 0 and key in ("perplexity", "bits_per_byte"):
                assert math.isnan(row[key])
            else:
                assert row[key] == pytest.approx(want[key][i], rel=1e-5), (i, key)
        assert isinstance(row["outlier"], bool)
    assert summary["num_documents"] == len(docs)
    assert summary["num_tokens"] == int(want["num_tokens"].sum())


def test_summary_outliers_and_id_field(saved, capsys, tmp_path):
    root, model, tokenizer, texts, _ = saved
    out = tmp_path / "s.jsonl"
    rc, stdout, err = run(capsys, "score-corpus", "--model", root / "model", "--input", root / "c.jsonl",
                          "--output", out, "--id-field", "doc", "--json", *OPTS)
    assert rc == 0, err
    summary = json.loads(stdout)
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"d{i:02d}" for i in range(len(texts))]
    assert list(rows[0]) == ["id", "num_tokens", "sum_nll", "sum_nll_sq", "num_bytes", "num_words",
                             "perplexity", "bits_per_byte", "outlier"]
    scored = [r for r in rows if r["num_tokens"] > 0]
    sum_nll = sum(r["sum_nll"] for r in scored)
    assert summary["num_documents"] == len(texts) and len(scored) == len(texts) - 1
    assert summary["perplexity"] == pytest.approx(math.exp(sum_nll / sum(r["num_tokens"] for r in scored)))
    assert summary["bits_per_byte"] == pytest.approx(sum_nll / sum(r["num_bytes"] for r in scored) / math.log(2))
    ppl = [r["perplexity"] for r in scored]
    assert summary["perplexity_percentiles"] == pytest.approx(
        {str(p): float(np.percentile(ppl, p)) for p in (1, 5, 10, 25, 50, 75, 90, 95, 99)})
    assert summary["documents_per_second"] > 0 and summary["tokens_per_second"] > 0
    # the garbled document is the one outlier, and the most extreme
    garbled = next(r for r in rows if r["id"] == "d18")
    assert garbled["perplexity"] > 20 * np.median(ppl)
    assert garbled["outlier"] and summary["outliers"][0] == "d18"
    assert summary["num_outliers"] == sum(r["outlier"] for r in rows) == len(summary["outliers"])
    assert summary["num_outliers"] <= 3
    # control: with a huge threshold nothing is flagged
    out2 = tmp_path / "s2.jsonl"
    rc, stdout, _ = run(capsys, "score-corpus", "--model", root / "model", "--input", root / "c.jsonl",
                        "--output", out2, "--outlier-z", "1e9", "--json", *OPTS)
    assert rc == 0 and json.loads(stdout)["num_outliers"] == 0
    # the table form prints the same figures
    out3 = tmp_path / "s3.parquet"
    rc, stdout, _ = run(capsys, "score-corpus", "--model", root / "model", "--input", root / "c.parquet",
                        "--output", out3, "--id-field", "n", *OPTS)
    assert rc == 0 and "perplexity p1..p99" in stdout and "outliers" in stdout
    assert [r["id"] for r in read_rows(out3)] == [str(i) for i in range(len(texts))]
    assert not os.path.exists(str(out3) + ".partial.jsonl")


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def start_child(root, inp, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "pplfast.cli", "score-corpus", "--model", str(root / "model"),
         "--input", str(inp), "--output", str(out), "--window", "32", "--batch-tokens", "32",
         "--no-progress", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT)


def wait_for_rows(path, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read().count(b"\n") >= count:
                    return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {count} rows after {timeout} s")


@pytest.fixture(scope="module")
def big(saved):
    root = saved[0]
    records = [{"text": t} for t in documents(160, seed=7)]
    write_jsonl(root / "big.jsonl", records)
    return root / "big.jsonl", len(records)


def test_resume_after_sigkill_gives_every_row_once(saved, big, tmp_path, capsys):
    root = saved[0]
    inp, total = big
    out = tmp_path / "s.jsonl"
    proc = start_child(root, inp, out)
    wait_for_rows(out, 20, proc)
    proc.kill()
    proc.wait()
    killed = read_rows(out)
    assert 20 <= len(killed) < total, "the run finished before it was killed: make the corpus larger"
    with open(out, "a") as f:
        f.write('{"id": "torn')  # as a kill in the middle of a write leaves it
    rc, _, err = run(capsys, "score-corpus", "--model", root / "model", "--input", inp,
                     "--output", out, "--json", *OPTS)
    assert rc == 1 and "--resume" in err  # an existing output is never overwritten
    rc, stdout, err = run(capsys, "score-corpus", "--model", root / "model", "--input", inp,
                          "--output", out, "--json", "--resume", *OPTS)
    assert rc == 0, err
    assert json.loads(stdout)["documents_this_run"] == total - len(killed)
    resumed = read_rows(out)
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == total
    whole = tmp_path / "whole.jsonl"
    rc, _, err = run(capsys, "score-corpus", "--model", root / "model", "--input", inp,
                     "--output", whole, *OPTS)
    assert rc == 0, err
    reference = {r["id"]: r for r in read_rows(whole)}
    assert set(ids) == set(reference)
    for row in resumed:
        ref = reference[row["id"]]
        assert row["num_tokens"] == ref["num_tokens"] and row["outlier"] == ref["outlier"]
        assert row["sum_nll"] == pytest.approx(ref["sum_nll"], rel=1e-5)


def test_ctrl_c_exits_130_and_keeps_finished_rows(saved, big, tmp_path):
    root = saved[0]
    inp, total = big
    out = tmp_path / "s.jsonl"
    proc = start_child(root, inp, out)
    wait_for_rows(out, 10, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0]
    with open(out, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.splitlines()]
    assert 10 <= len(rows) < total and all(r["outlier"] is None for r in rows)


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_are_removed(saved, scored, capsys, tmp_path):
    root = saved[0]
    # a run killed while it rewrote its output with the outlier flags: every row is in the
    # output (outlier still null), a half-written temporary file lies beside it
    finished = read_rows(scored[0])
    out = tmp_path / "s.jsonl"
    out.write_text("".join(dump_row({**r, "outlier": None}) for r in finished), encoding="utf-8")
    shutil.copy(str(scored[0]) + ".settings", str(out) + ".settings")  # the same run's settings
    dead = dead_pid()
    stale = tmp_path / f".s.jsonl.tmp-{dead}"
    stale.write_text(dump_row(finished[0]) + '{"id": "d0', encoding="utf-8")
    live_proc = subprocess.Popen(["sleep", "600"])  # another writer, still running: kept
    live = tmp_path / f".s.jsonl.tmp-{live_proc.pid}"
    live.write_text("")
    try:
        rc, stdout, err = run(capsys, "score-corpus", "--model", root / "model", "--input",
                              root / "c.jsonl", "--output", out, "--id-field", "doc", "--resume",
                              "--json", *OPTS)
        assert rc == 0, err
        assert json.loads(stdout)["documents_this_run"] == 0
        assert not stale.exists() and live.exists()
    finally:
        live_proc.kill()
        live_proc.wait()
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [r["id"] for r in finished]
    assert [r["outlier"] for r in rows] == [r["outlier"] for r in finished]
    # filter, both outputs
    kept, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl.gz"
    stale = [tmp_path / f".kept.jsonl.tmp-{dead}", tmp_path / f".rejected.jsonl.gz.tmp-{dead}"]
    for path in stale:
        path.write_bytes(b"half")
    rc, _, err = run(capsys, "filter", "--input", root / "c.jsonl", "--scores", out, "--output", kept,
                     "--rejected", rejected, "--max-perplexity", "1e9", "--id-field", "doc")
    assert rc == 0, err
    assert not any(p.exists() for p in stale) and kept.exists() and rejected.exists()
    # a new run (no --resume) to parquet: the final file's and the row file's temporaries
    fresh = tmp_path / "fresh.parquet"
    stale = [tmp_path / f".fresh.parquet.tmp-{dead}", tmp_path / f".fresh.parquet.partial.jsonl.tmp-{dead}"]
    for path in stale:
        path.write_bytes(b"PAR1")
    rc, _, err = run(capsys, "score-corpus", "--model", root / "model", "--input",
                     root / "c.jsonl", "--output", fresh, *OPTS)
    assert rc == 0, err
    assert not any(p.exists() for p in stale) and len(read_rows(fresh)) == len(finished)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]


def test_resume_at_ten_thousand_ids_adds_nothing_and_finishes_a_killed_run(saved, tmp_path, capsys):
    # past 4096 ids the index keeps them in numpy runs, where a digest ending in NUL bytes was
    # once lost (1 in 256): a finished run resumed appended those documents again
    root = saved[0]
    inp, out = tmp_path / "many.jsonl", tmp_path / "s.jsonl"
    write_jsonl(inp, [{"text": f"w{i % 7} x{i % 13}"} for i in range(10000)])
    argv = ["score-corpus", "--model", root / "model", "--input", inp, "--output", out,
            "--json", "--window", "16", "--batch-tokens", "4096", "--no-progress"]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    finished = out.read_text(encoding="utf-8")
    rc, stdout, err = run(capsys, *argv, "--resume")
    assert rc == 0, err
    assert json.loads(stdout)["documents_this_run"] == 0
    assert out.read_text(encoding="utf-8") == finished  # not a row added
    # a run killed after 6000 rows, in the middle of a write
    lines = finished.splitlines(True)
    out.write_text("".join(dump_row({**json.loads(line), "outlier": None}) for line in lines[:6000])
                   + lines[6000][:20], encoding="utf-8")
    rc, stdout, err = run(capsys, *argv, "--resume")
    assert rc == 0, err
    assert json.loads(stdout)["documents_this_run"] == 4000
    ids = [r["id"] for r in read_rows(out)]
    assert len(ids) == len(set(ids)) == 10000
    assert sorted(ids) == sorted(json.loads(line)["id"] for line in lines)


def test_on_error_skip_lists_every_bad_record_and_filter_skips_the_same(saved, capsys, tmp_path):
    root, _, _, texts, _ = saved
    inputs, good = write_bad_corpus(tmp_path, texts[:8])
    common = ["--model", root / "model", "--input", *inputs, "--id-field", "doc", *OPTS]
    out, errors = tmp_path / "s.jsonl", tmp_path / "errors.jsonl"
    rc, stdout, err = run(capsys, "score-corpus", *common, "--output", out)
    assert rc == 1 and err.strip() == (f"pplfast score-corpus: error: {inputs[0]}:2: not valid "
                                       "JSON (Expecting property name enclosed in double quotes)")
    os.unlink(out)
    rc, stdout, err = run(capsys, "score-corpus", *common, "--output", out, "--on-error", "skip",
                          "--errors", errors, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["num_skipped"] == len(BAD_RECORDS) and summary["num_documents"] == len(good)
    assert [r["id"] for r in read_rows(out)] == [g["doc"] for g in good]
    want = [{"file": inputs[0], "line": line, "reason": reason, "rest_unread": False}
            for line, reason in BAD_RECORDS]
    assert read_jsonl(errors) == want
    # the table says it too
    rc, stdout, err = run(capsys, "score-corpus", *common, "--output", tmp_path / "t.jsonl",
                          "--on-error", "skip", "--errors", tmp_path / "e2.jsonl")
    assert rc == 0, err
    line = next(line for line in stdout.splitlines() if line.startswith("skipped records"))
    assert line.split(None, 2)[2] == f"{len(BAD_RECORDS)} (listed in {tmp_path / 'e2.jsonl'})"
    # filter reads the corpus with the same reader: the same records are skipped (unscored,
    # listed), every other document is kept or rejected
    kept, rejected, ferrors = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl", tmp_path / "f.jsonl"
    argv = ["filter", "--input", *inputs, "--scores", out, "--output", kept, "--rejected",
            rejected, "--max-perplexity", "1e300", "--id-field", "doc"]
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and err.strip().endswith("bad.jsonl:2: not valid JSON (Expecting property "
                                            "name enclosed in double quotes)")
    rc, stdout, err = run(capsys, *argv, "--on-error", "skip", "--errors", ferrors, "--json")
    assert rc == 0, err
    figures = json.loads(stdout)
    assert figures["num_skipped"] == len(BAD_RECORDS) and figures["num_documents"] == len(good)
    assert read_jsonl(ferrors) == want
    assert sorted(r["doc"] for r in read_jsonl(kept) + read_jsonl(rejected)) == sorted(g["doc"] for g in good)


def test_resume_refuses_other_settings(saved, capsys, tmp_path):
    root = saved[0]
    inp, out = tmp_path / "c.jsonl", tmp_path / "s.jsonl"
    write_jsonl(inp, saved[4][:6])
    base = ["score-corpus", "--input", inp, "--output", out, "--no-progress", "--json"]
    rc, _, err = run(capsys, *base, "--model", root / "model", "--window", "32")
    assert rc == 0, err
    finished = out.read_text()
    other = tmp_path / "other-model"
    shutil.copytree(root / "model", other)
    for extra, needle in (
            (["--model", other, "--window", "32"], "--model"),
            (["--model", root / "model", "--window", "16"], "--window is 16 now but was 32"),
            (["--model", root / "model"], "--window is not given now but was 32"),
            (["--model", root / "model", "--window", "32", "--stats"], "--stats is on now but was off"),
            (["--model", root / "model", "--window", "32", "--mode", "chunks"], "--mode"),
            (["--model", root / "model", "--window", "32", "--stride", "8"], "--stride"),
            (["--model", root / "model", "--window", "32", "--id-field", "doc"], "--id-field"),
            (["--model", root / "model", "--window", "32", "--dtype", "bfloat16"],
             "the weights are bfloat16 now but were float32")):
        rc, stdout, err = run(capsys, *base, *extra, "--resume")
        lines = err.strip().splitlines()
        assert rc == 1 and stdout == "" and len(lines) == 1, (extra, err)
        assert lines[0].startswith("pplfast score-corpus: error: --resume: ") and needle in lines[0], (needle, lines[0])
        assert out.read_text() == finished
    rc, stdout, err = run(capsys, *base, "--model", root / "model", "--window", "32", "--resume")
    assert rc == 0 and json.loads(stdout)["documents_this_run"] == 0, err


def test_a_second_run_on_one_output_fails_at_once(saved, big, tmp_path, capsys):
    root = saved[0]
    inp, total = big
    out = tmp_path / "s.jsonl"
    proc = start_child(root, inp, out)
    try:
        wait_for_rows(out, 5, proc)
        for extra in (["--resume"], []):
            start = time.perf_counter()
            rc, stdout, err = run(capsys, "score-corpus", "--model", root / "model", "--input", inp,
                                  "--output", out, *OPTS, *extra)
            lines = err.strip().splitlines()
            assert rc == 1 and stdout == "" and len(lines) == 1, err
            assert f"is being written by another run (process {proc.pid})" in lines[0], lines[0]
            assert time.perf_counter() - start < 5  # at once, before the model loads
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    # the kernel released the dead run's lock: the next run resumes it
    rc, stdout, err = run(capsys, "score-corpus", "--model", root / "model", "--input", inp,
                          "--output", out, "--json", "--resume", "--window", "32",
                          "--batch-tokens", "256", "--no-progress")
    assert rc == 0, err
    ids = [r["id"] for r in read_rows(out)]
    assert len(ids) == len(set(ids)) == total
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "s.jsonl.settings"]


def test_stats_columns_match_the_models_own_distributions(saved, capsys, tmp_path):
    # documents shorter than the window: each token's distribution is the model's own logits
    # at the previous position, so entropy and top-1 hits follow from one forward pass
    import torch

    root, model, tokenizer, texts, _ = saved
    docs = [t for t in texts if t.strip() and len(tokenizer(t)["input_ids"]) <= 64][:5]
    assert len(docs) >= 3
    inp, out = tmp_path / "short.jsonl", tmp_path / "s.jsonl"
    write_jsonl(inp, [{"text": t} for t in docs])
    rc, _, err = run(capsys, "score-corpus", "--model", root / "model", "--input", inp,
                     "--output", out, "--stats", "--window", "64", "--no-progress")
    assert rc == 0, err
    rows = read_rows(out)
    for row, text in zip(rows, docs):
        ids = torch.tensor(tokenizer(text)["input_ids"])
        with torch.no_grad():
            logp = model(ids[None]).logits[0, :-1].double().log_softmax(-1)
        assert row["num_tokens"] == len(ids) - 1
        entropy = -(logp.exp() * logp).sum(-1).sum()
        hits = int((logp.argmax(-1) == ids[1:]).sum())
        assert row["sum_entropy"] == pytest.approx(float(entropy), rel=1e-4)
        assert row["top1_hits"] == hits
        assert row["sum_nll"] == pytest.approx(float(-logp.gather(-1, ids[1:, None]).sum()),
                                               rel=1e-4)


@pytest.mark.parametrize("case", ["missing-model", "model-without-config", "missing-input",
                                  "bad-jsonl", "no-field", "bad-backend", "bad-window",
                                  "bad-output", "duplicate-id", "bad-resume-file",
                                  "resume-without-settings", "skip-without-errors", "bad-device",
                                  "meta-device"])
def test_score_corpus_errors_are_one_line(saved, capsys, tmp_path, case):
    root = saved[0]
    model, inp, out = root / "model", root / "c.jsonl", tmp_path / "s.jsonl"
    extra, needles = [], []
    if case == "missing-model":  # pplfast score's line, not transformers' "Repo id must be..."
        model, needles = tmp_path / "no-model", ["model directory", "does not exist"]
    elif case == "model-without-config":
        model, needles = tmp_path / "empty-model", ["no config.json"]
        model.mkdir()
    elif case == "missing-input":
        inp = tmp_path / "absent.jsonl"
    elif case == "bad-jsonl":
        inp = tmp_path / "bad.jsonl"
        inp.write_text('{"text": "ok"}\n{nope\n')
    elif case == "no-field":
        extra = ["--text-field", "body"]
    elif case == "bad-backend":
        extra = ["--backend", "nope"]
    elif case == "bad-window":
        extra = ["--window", "0"]
    elif case == "bad-output":
        out = tmp_path / "s.csv"
    elif case == "duplicate-id":
        extra = ["--id-field", "dup"]
        inp = tmp_path / "dup.jsonl"
        inp.write_text('{"text": "a b", "dup": 1}\n{"text": "c d", "dup": 1}\n')
    elif case == "bad-resume-file":
        out.write_text('{"id": "a"}\nnot json\n')
        settings = {"model": os.path.realpath(model), "window": None, "stride": None,
                    "mode": "sliding", "stats": False, "text_field": "text", "id_field": None,
                    "format": "auto"}
        (tmp_path / "s.jsonl.settings").write_text(json.dumps(settings))
        extra, needles = ["--resume"], ["s.jsonl:2: not a score row"]
    elif case == "resume-without-settings":
        out.write_text('{"id": "a"}\n')
        extra, needles = ["--resume"], ["s.jsonl.settings", "is missing"]
    elif case == "skip-without-errors":
        extra, needles = ["--on-error", "skip"], ["--errors"]
    elif case == "bad-device":
        extra, needles = ["--device", "bogus"], ["--device", "'bogus'"]
    elif case == "meta-device":
        extra, needles = ["--device", "meta"], ["--device meta", "cannot run a model"]
    rc, stdout, err = run(capsys, "score-corpus", "--model", model, "--input", inp, "--output", out,
                          "--no-progress", *extra)
    assert rc == 1 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pplfast score-corpus: error: "), err
    assert "Traceback" not in err and "Repo id" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_transformers_loading_bar_is_silenced(saved, capsys, tmp_path):
    # transformers' bar state is global: turn it on, as in a fresh process, with a control
    import transformers
    from transformers.utils import logging as hf_logging

    root = saved[0]
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        transformers.AutoModelForCausalLM.from_pretrained(root / "model")
        assert "Loading weights" in capsys.readouterr().err  # the control: the bar exists
        hf_logging.enable_progress_bar()
        rc, _, err = run(capsys, "score-corpus", "--model", root / "model", "--input",
                         root / "c.jsonl", "--output", tmp_path / "s.jsonl", *OPTS[:-1])
        assert rc == 0, err
        assert "Loading weights" not in err
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


# ---------------------------------------------------------------- filter

@pytest.fixture(scope="module")
def scored(saved, tmp_path_factory):
    from pplfast.cli import main

    root = saved[0]
    out = tmp_path_factory.mktemp("scores") / "scores.jsonl"
    assert main(["score-corpus", "--model", str(root / "model"), "--input", str(root / "c.jsonl"),
                 "--output", str(out), "--id-field", "doc", "--json", *OPTS]) == 0
    return out, {r["id"]: r for r in read_rows(out)}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("by", ["perplexity", "bits_per_byte"])
def test_filter_percentile_bands_partition_the_corpus(saved, scored, capsys, tmp_path, by):
    root, _, _, texts, records = saved
    scores_path, scores = scored
    values = np.array([r[by] for r in scores.values() if np.isfinite(r[by])])
    kept_ids = []
    for band in ("0:30", "30:60", "60:100"):
        kept, rejected = tmp_path / f"k{band[0]}.jsonl", tmp_path / f"r{band[0]}.jsonl"
        rc, out, err = run(capsys, "filter", "--input", root / "c.jsonl", "--scores", scores_path,
                           "--output", kept, "--rejected", rejected, "--percentile-band", band,
                           "--by", by, "--id-field", "doc", "--json")
        assert rc == 0, err
        figures = json.loads(out)
        lo, hi = (float(x) for x in band.split(":"))
        lo_v, hi_v = np.percentile(values, [lo, hi])
        kept_rows, rejected_rows = read_jsonl(kept), read_jsonl(rejected)
        assert len(kept_rows) + len(rejected_rows) == len(texts) == figures["num_documents"]
        for row in kept_rows:
            assert lo_v <= row["pplfast"][by] <= hi_v
            original = records[int(row["doc"][1:])]
            assert {k: v for k, v in row.items() if k != "pplfast"} == original  # unchanged
            assert row["pplfast"]["id"] == row["doc"] and row["pplfast"]["sum_nll"] == scores[row["doc"]]["sum_nll"]
        for row in rejected_rows:
            v = row["pplfast"][by]
            assert v is None or not (lo_v <= v < hi_v)
        assert any(r["pplfast"][by] is None for r in rejected_rows)  # the empty document
        kept_ids += [r["doc"] for r in kept_rows]
    assert sorted(kept_ids) == sorted(i for i, r in scores.items() if np.isfinite(r[by]))


def test_filter_thresholds_txt_corpus_and_default_ids(saved, capsys, tmp_path):
    root = saved[0]
    scores = tmp_path / "s.jsonl"
    rc, _, err = run(capsys, "score-corpus", "--model", root / "model", "--input", root / "txt",
                     "--output", scores, *OPTS)
    assert rc == 0, err
    values = sorted(r["perplexity"] for r in read_rows(scores) if math.isfinite(r["perplexity"]))
    assert len(values) == 5  # the sixth file is whitespace: unscored, always rejected
    cut = (values[2] + values[3]) / 2
    for flag, expect in (("--max-perplexity", 3), ("--min-perplexity", 2)):
        kept = tmp_path / "kept.jsonl.gz"
        rc, out, err = run(capsys, "filter", "--input", root / "txt", "--scores", scores,
                           "--output", kept, flag, cut)
        assert rc == 0, err
        with gzip.open(kept, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == expect and out.startswith(f"kept {expect} of 6 documents")
        assert all(set(r) == {"text", "pplfast"} for r in rows)
        ok = (lambda v: v <= cut) if flag == "--max-perplexity" else (lambda v: v >= cut)
        assert all(ok(r["pplfast"]["perplexity"]) for r in rows)


@pytest.mark.parametrize("case", ["other-corpus", "unknown-ids", "missing-ids", "duplicate-scores",
                                  "bad-band", "reversed-band", "negative", "no-scores-file",
                                  "wrong-id-field", "parquet-output", "bad-rejected",
                                  "output-dir-missing"])
def test_filter_errors_are_one_line(saved, scored, capsys, tmp_path, case):
    root = saved[0]
    scores_path, scores = scored
    inp, band = root / "c.jsonl", ["--percentile-band", "30:60"]
    extra, needles = ["--id-field", "doc"], []
    output = tmp_path / "kept.jsonl"
    if case == "unknown-ids":  # every document scored, and more: only the unknown-id error
        inp = tmp_path / "subset.jsonl"
        write_jsonl(inp, saved[4][:12])
        needles = [f"{len(scores) - 12} score rows have ids not in the corpus"]
    elif case == "parquet-output":
        output, needles = tmp_path / "kept.parquet", ["--output", "kept.parquet", ".jsonl"]
    elif case == "bad-rejected":
        extra += ["--rejected", str(tmp_path / "rejected.csv")]
        needles = ["--rejected", "rejected.csv", ".jsonl.gz"]
    elif case == "output-dir-missing":
        output, needles = tmp_path / "nope" / "kept.jsonl", ["--output", "does not exist"]
    elif case == "other-corpus":
        inp = tmp_path / "other.jsonl"
        write_jsonl(inp, [{"text": "x", "doc": f"d{i:02d}"} for i in range(len(scores) + 2)])
    elif case == "missing-ids":
        needles = ["have no score row"]
        scores_path = tmp_path / "part.jsonl"
        lines = open(scored[0], encoding="utf-8").read().splitlines(True)
        scores_path.write_text("".join(lines[:10]), encoding="utf-8")
    elif case == "duplicate-scores":
        scores_path = tmp_path / "dup.jsonl"
        lines = open(scored[0], encoding="utf-8").read().splitlines(True)
        scores_path.write_text("".join(lines + lines[:1]), encoding="utf-8")
    elif case == "bad-band":
        band = ["--percentile-band", "thirty:60"]
    elif case == "reversed-band":
        band = ["--percentile-band", "60:30"]
    elif case == "negative":
        band = ["--max-perplexity", "-1"]
    elif case == "no-scores-file":
        scores_path = tmp_path / "none.jsonl"
    elif case == "wrong-id-field":
        extra = []
    if case in ("parquet-output", "bad-rejected", "output-dir-missing"):
        scores_path = tmp_path / "never-read.jsonl"  # refused before any file is read
    before = set(os.listdir(tmp_path))
    rc, out, err = run(capsys, "filter", "--input", inp, "--scores", scores_path, "--output",
                       output, *band, *extra)
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pplfast filter: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert set(os.listdir(tmp_path)) == before  # nothing written, not even a temporary file


def test_score_corpus_past_exp_range_ends_cleanly(tmp_path):
    """`pplfast score-corpus` on a model whose output layer is scaled so that the mean NLL is
    thousands of nats: exit 0, the summary's perplexity inf, no traceback."""
    import json
    import subprocess
    import sys

    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=48)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e4)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                 for t in documents(3, seed=4, lines=(1, 9))))
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast", "score-corpus", "--model", str(tmp_path / "model"),
         "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "out.jsonl"),
         "--window", "32", "--json", "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads(proc.stdout, parse_constant=lambda name: pytest.fail(
        f"--json printed {name}, which strict JSON parsers refuse"))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    mean = sum(r["sum_nll"] for r in rows) / sum(r["num_tokens"] for r in rows)
    assert mean > 1000 and summary["perplexity"] is None  # inf, written as null
