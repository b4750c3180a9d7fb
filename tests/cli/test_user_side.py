"""The user's side: one clear line for every mistake, no lost work, outputs people can read
(the API's bad options: tests/test_user_side_api.py).

CLI cases run through ``pplfast.cli.main`` (exit code, one line on stderr, no traceback) and the
same matrix again as real processes (a few at a time), as does everything where the process
itself matters (Ctrl-C, transformers' progress bars).
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
from builders import corpus, save_tiny_llama
from pplfast.cli import main
from pplfast.cli._common import human, token_text
from pplfast.corpus.io import CorpusIOError, expand_inputs, file_kind, iter_documents

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ux")
    model, tokenizer = save_tiny_llama(root)
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
    assert file_kind(str(path)) == "jsonl"
    assert read_texts(path) == texts


def test_json_array_and_txt_and_explicit_format(saved, tmp_path):
    texts = saved[3]
    arr = tmp_path / "docs.json"
    arr.write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    assert read_texts(arr) == texts
    txt = tmp_path / "book.TXT"
    txt.write_text(texts[0], encoding="utf-8")
    assert read_texts(txt) == [texts[0]]
    odd = tmp_path / "corpus.data"
    odd.write_text(saved[4], encoding="utf-8")
    assert read_texts(odd, fmt="jsonl") == texts
    assert read_texts(odd, fmt="txt") == [saved[4]]


def read_texts(path, fmt="auto"):
    files = expand_inputs([str(path)], fmt)
    return [doc.text for doc in iter_documents(files, fmt=fmt)]


def test_unknown_extension_is_refused(saved, tmp_path, capsys):
    odd = tmp_path / "corpus.csv"
    odd.write_text("text\nhello\n")
    with pytest.raises(CorpusIOError, match="--format"):
        expand_inputs([str(odd)])
    rc, out, err = run_cli(capsys, "--model", saved[0] / "model", "--input", odd, "--no-progress")
    assert_one_line_error(rc, out, err, "corpus.csv", "--format")


# ---- score_model: empty input and bad ids -------------------------------------------------------

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

CLI_ERROR_CASES = ["window-past-context", "prefix-negative", "prefix-past-vocab", "device-meta",
                   "device-bogus", "plot-txt", "json-dir-missing", "model-dir-missing",
                   "model-dir-no-config", "nothing-to-score", "per-document-without-json"]
# refused before the model is loaded
EARLY_CASES = ("plot-txt", "json-dir-missing", "per-document-without-json")


def cli_error_case(root, tmp_path, case):
    """``(argv after "score", needles of the error line)`` of one case of the matrix."""
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
    argv = ["--model", model, "--input", inp, "--no-progress", *extra]
    return [str(a) for a in argv], needles


@pytest.mark.parametrize("case", CLI_ERROR_CASES)
def test_cli_errors(saved, tmp_path, capsys, case):
    argv, needles = cli_error_case(saved[0], tmp_path, case)
    start = time.perf_counter()
    rc, out, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, out, err, *needles)
    assert "Perplexity.compute" not in err
    if case in ("plot-txt", "json-dir-missing"):
        assert time.perf_counter() - start < 5  # refused before the model was loaded


def pplfast_command(*argv):
    return [sys.executable, "-m", "pplfast.cli", *map(str, argv)]


def run_commands(commands, workers=3):
    """``{name: CompletedProcess}`` of ``{name: argv}``, a few processes at a time (each mostly
    imports torch and transformers)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def one(argv):
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)

    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(one, argv) for name, argv in commands.items()}
    return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def processes(saved, tmp_path_factory):
    """Every command of the tests below run once as a real process, all started together."""
    root = saved[0]
    commands, needles = {}, {}
    for case in CLI_ERROR_CASES:
        argv, needles[case] = cli_error_case(root, tmp_path_factory.mktemp(case), case)
        commands[case] = pplfast_command("score", *argv)
    # a successful run with pplfast's own progress bar on, and transformers' bar as the control
    commands["bars"] = pplfast_command("score", "--model", root / "model", "--input",
                                       root / "docs.jsonl", "--window", 32)
    commands["bars-control"] = [
        sys.executable, "-c", "import sys, transformers; "
        "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(root / "model")]
    return run_commands(commands), needles


@pytest.mark.parametrize("case", CLI_ERROR_CASES)
def test_cli_errors_through_a_subprocess(processes, case):
    results, needles = processes
    proc = results[case]
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, *needles[case])
    assert "Perplexity.compute" not in proc.stderr


def test_transformers_loading_bar_is_silenced(processes):
    results = processes[0]
    run, control = results["bars"], results["bars-control"]
    assert run.returncode == 0 and "perplexity" in run.stdout, run.stderr
    assert "scoring" in run.stderr  # pplfast's own bar stays
    assert control.returncode == 0 and "Loading weights" in control.stderr, control.stderr
    assert "Loading weights" not in run.stderr, run.stderr


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
    assert [d["id"] for d in docs] == [f"{root / 'docs.jsonl'}:{i + 1}" for i in range(len(texts))]
    assert sum(d["num_tokens"] for d in docs) == figures["num_tokens"]
    assert sum(d["sum_nll"] for d in docs) == pytest.approx(figures["sum_nll"], rel=1e-9)
    assert not list(tmp_path.glob(".*"))  # no temporary or lock file left behind


@pytest.mark.parametrize("form", ["table", "json"])
def test_summary_printed_before_a_failing_per_token_write(saved, tmp_path, capsys, monkeypatch,
                                                          form):
    import contextlib
    import errno

    import pplfast.cli._common as common_module

    real_output = common_module.atomic_output

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def full_disk(path, mode="w", *, label=None):
        with real_output(path, mode, label=label):  # the temporary file is made, then the disk fills up
            yield FullDisk()

    monkeypatch.setattr(common_module, "atomic_output", full_disk)
    root, model, tokenizer, texts, _ = saved
    per_token = tmp_path / "tokens.jsonl"
    rc, out, err = run_cli(capsys, "--model", root / "model", "--input", root / "docs.jsonl",
                           "--window", 32, "--per-token", per_token, "--no-progress",
                           *(["--json"] if form == "json" else []))
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pplfast score: error: cannot write --per-token")
    assert "No space left on device" in lines[0] and "Traceback" not in err
    # the figures reached stdout before the write failed
    want = pplfast.score_texts(model, tokenizer, texts, window=32).corpus
    if form == "json":
        figures = json.loads(out)
        assert figures["num_tokens"] == want.num_tokens
        assert figures["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    else:
        table = dict(line.split("  ", 1) for line in out.strip().splitlines())
        assert table["tokens scored"].strip() == f"{want.num_tokens:,}"
        assert float(table["perplexity"].split(" ± ")[0]) == pytest.approx(want.perplexity, abs=1e-4)
    assert os.listdir(tmp_path) == []  # neither a truncated file nor a temporary one


@pytest.mark.parametrize("case", ["missing-directory", "parent-is-a-file", "is-a-directory",
                                  "read-only-directory"])
def test_unwritable_plot_path_refused_before_scoring(saved, tmp_path, capsys, monkeypatch, case):
    import pplfast.cli.score as score_module

    if case == "missing-directory":
        plot, needle = tmp_path / "nope" / "nll.png", "does not exist"
    elif case == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        plot, needle = tmp_path / "file" / "nll.png", "does not exist"
    elif case == "is-a-directory":
        plot, needle = tmp_path / "plots.png", "is a directory"
        plot.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "ro").mkdir(mode=0o555)
        plot, needle = tmp_path / "ro" / "nll.png", "not writable"

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --plot was checked")

    monkeypatch.setattr(score_module, "load_model", no_model)
    rc, out, err = run_cli(capsys, "--model", saved[0] / "model", "--input",
                           saved[0] / "docs.jsonl", "--plot", plot, "--no-progress")
    assert_one_line_error(rc, out, err, "--plot", needle)


class FakeDocument:
    """What plot_data reads of a scored document."""

    def __init__(self, nll, scored):
        self.token_nll = torch.as_tensor(nll, dtype=torch.float32)
        self.scored = torch.as_tensor(scored, dtype=torch.bool)
        self.token_ids = torch.zeros(len(nll), dtype=torch.long)


def random_documents(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        scored = torch.rand(n, generator=gen) > 0.2
        scored[:1] = False  # the first token is never scored
        docs.append(FakeDocument(torch.rand(n, generator=gen) * 8, scored))
    return docs


def moving_average(values, width, positions):
    """The edge-padded moving average at ``positions``, each a sum written out."""
    lo, hi = width // 2, width - 1 - width // 2
    padded = [values[0]] * lo + list(values) + [values[-1]] * hi
    return np.array([sum(padded[i:i + width]) / width for i in positions])


@pytest.mark.parametrize("lengths,width", [((7, 3, 30), 1), ((1000, 2, 517, 999), 19),
                                           ((30001, 40, 26000), 512)])
def test_plot_data_documents_per_position_and_smoothing(lengths, width):
    from pplfast.cli.score import plot_data

    docs = random_documents(lengths, seed=sum(lengths))
    data = plot_data(docs, window=None)
    length = max(lengths)
    count = np.zeros(length, dtype=np.int64)
    total = np.zeros(length)
    for doc in docs:
        for pos, (value, ok) in enumerate(zip(doc.token_nll.tolist(), doc.scored.tolist())):
            if ok:
                count[pos] += 1
                total[pos] += value
    positions = np.flatnonzero(count)
    assert positions[0] == 1
    np.testing.assert_array_equal(data.positions, positions)
    np.testing.assert_array_equal(data.documents, count[positions])
    np.testing.assert_allclose(data.mean, total[positions] / count[positions], rtol=1e-12, atol=0)
    # the width follows the length: ~2% of the scored positions, from 1 up to 512 tokens
    assert data.width == width == min(512, max(1, len(positions) // 50))
    n = len(positions)
    # every position when short; else both edges (the padding) and one position in 97
    check = (np.arange(n) if n < 2000 else
             np.unique(np.concatenate([np.arange(600), np.arange(0, n, 97), np.arange(n - 600, n)])))
    np.testing.assert_allclose(data.smooth[check], moving_average(data.mean, width, check),
                               rtol=1e-12, atol=1e-12)
    assert len(data.smooth) == len(data.mean)


def test_plot_data_window_boundary():
    from pplfast.cli.score import plot_data

    docs = random_documents((40, 90, 12), seed=3)
    assert plot_data(docs, window=32).window == 32  # a document runs past the first window
    assert plot_data(docs, window=89).window == 89
    assert plot_data(docs, window=90).window is None  # no document reaches past it
    assert plot_data(docs, window=None).window is None


def test_plot_figure_draws_the_data():
    from pplfast.cli.score import plot_data, plot_figure

    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    data = plot_data(random_documents((300, 150, 20), seed=5), window=64)
    fig = plot_figure(data, "title")
    try:
        ax, docs_ax = fig.axes
        mean_line, smooth_line, window_line = ax.get_lines()
        np.testing.assert_array_equal(mean_line.get_xdata(), data.positions)
        np.testing.assert_array_equal(mean_line.get_ydata(), data.mean)
        np.testing.assert_array_equal(smooth_line.get_ydata(), data.smooth)
        assert smooth_line.get_label() == f"moving average ({data.width} tokens)"
        assert list(window_line.get_xdata()) == [64, 64]
        assert window_line.get_label() == "window (64 tokens)"
        (fill,) = docs_ax.collections
        heights = fill.get_paths()[0].vertices[:, 1]
        assert heights.max() == data.documents.max() == 3 and heights.min() == 0
        assert docs_ax.get_ylabel() == "documents at this position"
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[-1] == "documents at this position"
    finally:
        plt.close(fig)
    fig = plot_figure(plot_data(random_documents((50,), seed=6), window=None), "title")
    try:
        assert len(fig.axes[0].get_lines()) == 2  # no window line when nothing passes it
    finally:
        plt.close(fig)


def test_plot_of_a_run_gets_the_runs_documents_and_window(saved, tmp_path, capsys, monkeypatch):
    import pplfast.cli.score as score_module

    root, model, tokenizer, texts, _ = saved
    seen = []
    real = score_module.plot_figure
    monkeypatch.setattr(score_module, "plot_figure", lambda data, title: seen.append(data) or real(data, title))
    plot = tmp_path / "nll.svg"
    rc, _, err = run_cli(capsys, "--model", root / "model", "--input", root / "docs.jsonl",
                         "--window", 16, "--stride", 8, "--plot", plot, "--no-progress")
    assert rc == 0, err
    assert plot.read_text().lstrip().startswith(("<?xml", "<svg"))
    (data,) = seen
    docs = pplfast.score_texts(model, tokenizer, texts, window=16, stride=8).documents
    lengths = [len(d.token_ids) for d in docs]
    assert max(lengths) > 16, "the test needs a document longer than the window"
    count = np.zeros(max(lengths), dtype=np.int64)
    for d in docs:
        count[:len(d.scored)] += d.scored.numpy()
    np.testing.assert_array_equal(data.documents, count[count > 0])
    assert data.window == 16


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
    assert not per_token.exists() and not list(tmp_path.glob(".*"))
