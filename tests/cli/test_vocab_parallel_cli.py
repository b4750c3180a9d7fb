"""`torchrun --nproc-per-node 2 -m pplfast score ... --tp 2` (gloo on CPU): the model split over
the two processes (docs/vocab_parallel.md), the same figures and per-token rows as one process;
rank 0 alone prints and writes; a --tp that is not the job's size, or no torchrun, is one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from pplfast.cli import main
from builders import corpus, save_tiny_llama

pytest.importorskip("transformers")
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    save_tiny_llama(root)
    texts = [" ".join(corpus(n, seed=50 + n)) for n in (3, 7)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts),
                                     encoding="utf-8")
    return root


def _torchrun(root, nproc, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m",
                           "pplfast", "score", "--model", str(root / "model"), "--input",
                           str(root / "docs.jsonl"), "--no-progress", *map(str, argv)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)


def test_score_tp2_matches_one_process(saved, capsys):
    root = saved
    rc = main(["score", "--model", str(root / "model"), "--input", str(root / "docs.jsonl"),
               "--window", "32", "--stats", "--json", str(root / "one.json"), "--per-token",
               str(root / "one.jsonl"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    proc = _torchrun(root, 2, "--window", 32, "--stats", "--json", root / "tp.json",
                     "--per-token", root / "tp.jsonl", "--tp", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, tp = (json.loads((root / f"{n}.json").read_text()) for n in ("one", "tp"))
    assert tp["num_tokens"] == one["num_tokens"] and tp["num_windows"] == one["num_windows"]
    for key in ("perplexity", "mean_nll", "bits_per_byte", "mean_entropy", "top1_accuracy"):
        assert tp[key] == pytest.approx(one[key], rel=1e-5), key
    rows = [(root / f"{n}.jsonl").read_text().splitlines() for n in ("one", "tp")]
    assert len(rows[0]) == len(rows[1])
    for a, b in zip(*map(lambda r: [json.loads(x) for x in r], rows)):
        assert (a["token_id"], a["argmax"], a["rank"]) == (b["token_id"], b["argmax"], b["rank"])
        if a["nll"] is not None:
            assert b["nll"] == pytest.approx(a["nll"], rel=1e-4, abs=1e-5)


def test_score_tp2_prints_once(saved):
    proc = _torchrun(saved, 2, "--window", 32, "--tp", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tokens scored") == 1, proc.stdout  # rank 0's table only


def test_tp_errors_are_one_line(saved, capsys):
    rc = main(["score", "--model", str(saved / "model"), "--input", str(saved / "docs.jsonl"),
               "--tp", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and "torchrun --nproc-per-node 2" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    proc = _torchrun(saved, 2, "--tp", 3)
    # each rank says it in one line; the only traceback is torchrun's own report of the exit
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "pplfast score: error: --tp 3 needs 3 processes, torchrun started 2" in proc.stderr
    assert os.sep + "pplfast" + os.sep not in proc.stderr, proc.stderr[-3000:]
