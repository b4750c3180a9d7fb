"""The one document reader and the one output writer (pplfast.corpus.io, pplfast.corpus.writer)
through every command.

Every input kind the reader takes gives the same documents (texts, and ids where the command has
them) in `pplfast score`, `compare`, `score-corpus` and `filter` (Ray's reader: test_ray.py), and a
bad file the same one-line error; outputs are created with the umask's mode and keep an existing
file's mode; an output that is an input or another output is refused before any work; symlinks
and FIFOs are written through, not replaced (the reader and writer alone: test_corpus_io.py).
"""
import contextlib
import json
import os
import select
import stat
import threading

import pytest

from builders import (BAD_FILES, build_model, corpus, json_lines, train_tokenizer, write_bad,
                      write_every_kind)
from pplfast.cli import main

pytest.importorskip("transformers")

WINDOW = ["--window", "16", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("io-model")
    tokenizer = train_tokenizer()
    build_model("llama", len(tokenizer), context=48).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Spy:
    """Wraps a function and records one argument of each call."""

    def __init__(self, fn, pick):
        self.fn, self.pick, self.calls = fn, pick, []

    def __call__(self, *args, **kwargs):
        self.calls.append(self.pick(args, kwargs))
        return self.fn(*args, **kwargs)


def test_every_command_reads_every_kind_the_same(model_dir, tmp_path, capsys, monkeypatch):
    import pplfast.cli.compare
    import pplfast.cli.score
    import pplfast.corpus

    paths, expected = write_every_kind(tmp_path)
    texts = [t for _, t in expected]
    # score: the documents handed to score_texts
    spy = Spy(pplfast.cli.score.score_texts, lambda a, k: list(a[2]))
    monkeypatch.setattr(pplfast.cli.score, "score_texts", spy)
    rc, _, err = run(capsys, "score", "--model", model_dir, "--input", *paths, "--json", *WINDOW)
    assert rc == 0, err
    assert spy.calls == [texts]
    # compare: the documents it tokenizes
    spy = Spy(pplfast.cli.compare._tokenize, lambda a, k: list(a[2]))
    monkeypatch.setattr(pplfast.cli.compare, "_tokenize", spy)
    rc, _, err = run(capsys, "compare", "--base", model_dir, "--model", model_dir, "--input",
                     *paths, "--json", *WINDOW)
    assert rc == 0, err
    assert spy.calls == [texts]
    # score-corpus: the texts scored, and the ids of the rows
    spy = Spy(pplfast.corpus.CorpusScorer.score_texts, lambda a, k: list(a[1]))
    monkeypatch.setattr(pplfast.corpus.CorpusScorer, "score_texts",
                        lambda self, *a, **k: spy(self, *a, **k))
    scores = tmp_path / "scores.jsonl"
    rc, _, err = run(capsys, "score-corpus", "--model", model_dir, "--input", *paths,
                     "--output", scores, "--json", *WINDOW)
    assert rc == 0, err
    assert [t for call in spy.calls for t in call] == texts
    assert [r["id"] for r in read_jsonl(scores)] == [i for i, _ in expected]
    # filter: every document comes out, kept or rejected, with its id and record
    kept, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
    rc, _, err = run(capsys, "filter", "--input", *paths, "--scores", scores, "--output", kept,
                     "--rejected", rejected, "--max-perplexity", "1e300")
    assert rc == 0, err
    out = {r["pplfast"]["id"]: (r["text"] or "") for r in read_jsonl(kept) + read_jsonl(rejected)}
    assert out == dict(expected) and len(out) == len(expected)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_file_gives_the_same_error_in_every_command(model_dir, tmp_path, capsys, name):
    bad = write_bad(tmp_path, name)
    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"id": "x", "perplexity": 1.0}\n')
    commands = {
        "score": ["score", "--model", model_dir, "--input", bad, *WINDOW],
        "compare": ["compare", "--base", model_dir, "--model", model_dir, "--input", bad, *WINDOW],
        "score-corpus": ["score-corpus", "--model", model_dir, "--input", bad, "--output",
                         tmp_path / "s.jsonl", *WINDOW],
        "filter": ["filter", "--input", bad, "--scores", scores, "--output", tmp_path / "k.jsonl",
                   "--max-perplexity", "10"],
    }
    messages = {}
    for command, argv in commands.items():
        rc, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and out == "" and len(lines) == 1, (command, err)
        prefix = f"pplfast {command}: error: "
        assert lines[0].startswith(prefix), lines[0]
        messages[command] = lines[0][len(prefix):]
    assert len(set(messages.values())) == 1, messages
    assert BAD_FILES[name][1] in messages["score"]


def test_unknown_kind_is_refused_in_every_command_and_format_names_it(model_dir, tmp_path, capsys):
    odd = tmp_path / "corpus.data"
    odd.write_text(json_lines([{"text": "a b c"}, {"text": "d e f"}]))
    scores = tmp_path / "scores.jsonl"
    for command, argv in {
        "score": ["score", "--model", model_dir, *WINDOW],
        "score-corpus": ["score-corpus", "--model", model_dir, "--output", scores, *WINDOW],
    }.items():
        rc, out, err = run(capsys, *argv, "--input", odd)
        assert rc == 1 and "corpus.data" in err and "--format" in err, err
        rc, out, err = run(capsys, *argv, "--input", odd, "--format", "jsonl")
        assert rc == 0, err
    assert [r["id"] for r in read_jsonl(scores)] == [f"{odd}:1", f"{odd}:2"]


# ---- output files ------------------------------------------------------------------------------

@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_take_the_umasks_mode_and_keep_an_existing_files_mode(model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    doc = tmp_path / "docs.jsonl"
    doc.write_text(json_lines([{"text": " ".join(corpus(3, seed=5))}, {"text": "the quick fox"}]))
    old = tmp_path / "old"
    old.mkdir()
    existing = {name: old / name for name in ("tokens.jsonl", "s.jsonl", "rejected.jsonl")}
    for path in existing.values():
        path.write_text("old\n")
        os.chmod(path, 0o604)
    new = tmp_path / "new"
    new.mkdir()
    with umask(0o027):
        rc, _, err = run(capsys, "score", "--model", model_dir, "--input", doc, "--json",
                         new / "figures.json", "--per-token", existing["tokens.jsonl"], "--plot",
                         new / "nll.png", *WINDOW)
        assert rc == 0, err
        rc, _, err = run(capsys, "compare", "--base", model_dir, "--model", model_dir, "--input",
                         doc, "--json", new / "compare.json", "--per-token", new / "ctokens.jsonl",
                         *WINDOW)
        assert rc == 0, err
        rc, _, err = run(capsys, "score-corpus", "--model", model_dir, "--input", doc, "--output",
                         new / "s.jsonl", *WINDOW)
        assert rc == 0, err
        rc, _, err = run(capsys, "score-corpus", "--model", model_dir, "--input", doc, "--output",
                         new / "s.parquet", *WINDOW)
        assert rc == 0, err
        rc, _, err = run(capsys, "filter", "--input", doc, "--scores", new / "s.jsonl", "--output",
                         new / "kept.jsonl", "--rejected", existing["rejected.jsonl"],
                         "--max-perplexity", "1e300")
        assert rc == 0, err
        # a resumed run rewrites its output with the outlier flags: the file keeps its mode
        os.replace(new / "s.jsonl", existing["s.jsonl"])
        os.replace(new / "s.jsonl.settings", old / "s.jsonl.settings")
        os.chmod(existing["s.jsonl"], 0o604)
        rc, _, err = run(capsys, "score-corpus", "--model", model_dir, "--input", doc, "--output",
                         existing["s.jsonl"], "--resume", *WINDOW)
        assert rc == 0, err
    modes = {p.name: mode(p) for p in new.iterdir()}
    assert modes == dict.fromkeys(modes, 0o640) and len(modes) >= 7, modes
    assert {p.name: mode(p) for p in existing.values()} == dict.fromkeys(existing, 0o604)
    assert read_jsonl(existing["tokens.jsonl"])[0]["document"] == 0  # rewritten, mode kept


def test_an_output_that_is_an_input_or_another_output_is_refused(model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import pplfast.cli.score

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(pplfast.cli.score, "load_model", no_model)
    doc = tmp_path / "docs.jsonl"
    content = json_lines([{"text": "a b c d"}])
    doc.write_text(content)
    link = tmp_path / "link.jsonl"
    link.symlink_to(doc)
    hard = tmp_path / "hard.jsonl"
    os.link(doc, hard)
    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"id": "x", "perplexity": 1.0}\n')
    taken = tmp_path / "taken.jsonl"
    taken.write_text("keep me\n")
    cases = [
        (["score", "--model", model_dir, "--input", doc, "--json", doc], "--json", "input"),
        (["score", "--model", model_dir, "--input", doc, "--per-token", link], "--per-token", "input"),
        (["score", "--model", model_dir, "--input", doc, "--json", hard], "--json", "input"),
        (["score", "--model", model_dir, "--input", doc, "--json", taken, "--per-token", taken],
         "--per-token", "--json"),
        (["compare", "--base", model_dir, "--model", model_dir, "--input", doc, "--json", doc],
         "--json", "input"),
        (["filter", "--input", doc, "--scores", scores, "--output", doc, "--max-perplexity", "1"],
         "--output", "input"),
        (["filter", "--input", doc, "--scores", scores, "--output", scores, "--max-perplexity", "1"],
         "--output", "input"),
        (["filter", "--input", doc, "--scores", scores, "--output", taken, "--rejected", taken,
          "--max-perplexity", "1"], "--rejected", "--output"),
        (["score-corpus", "--model", tmp_path / "no-model", "--input", doc, "--output", hard],
         "--output", "input"),
    ]
    for argv, *needles in cases:
        rc, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and out == "" and len(lines) == 1, (argv, err)
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert doc.read_text() == content and taken.read_text() == "keep me\n"
    assert link.is_symlink() and os.path.samefile(doc, hard)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["docs.jsonl", "link.jsonl", "hard.jsonl", "scores.jsonl", "taken.jsonl"])


def test_symlinked_outputs_are_written_through(model_dir, tmp_path, capsys):
    doc = tmp_path / "docs.jsonl"
    doc.write_text(json_lines([{"text": " ".join(corpus(2, seed=8))}]))
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "figures.json"
    target.write_text("old")
    link = tmp_path / "figures.json"
    link.symlink_to(target)
    dangling = tmp_path / "tokens.jsonl"
    dangling.symlink_to(tmp_path / "real" / "tokens.jsonl")
    rc, _, err = run(capsys, "score", "--model", model_dir, "--input", doc, "--json", link,
                     "--per-token", dangling, *WINDOW)
    assert rc == 0, err
    assert link.is_symlink() and dangling.is_symlink()
    assert json.loads(target.read_text())["num_documents"] == 1
    assert read_jsonl(tmp_path / "real" / "tokens.jsonl")[0]["position"] == 0
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["figures.json", "tokens.jsonl"]


def test_a_fifo_output_is_written_to_not_replaced(model_dir, tmp_path, capsys):
    doc = tmp_path / "docs.jsonl"
    doc.write_text(json_lines([{"text": " ".join(corpus(4, seed=9))}]))
    fifo = tmp_path / "tokens.fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there: the writer's open returns
    received, done = bytearray(), threading.Event()

    def drain():
        while not done.is_set():
            data = b""
            if select.select([fd], [], [], 0.05)[0]:
                with contextlib.suppress(BlockingIOError):
                    data = os.read(fd, 1 << 16)
            received.extend(data)
            if not data:  # no writer yet, or it closed: the FIFO reads as empty
                done.wait(0.01)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        rc, out, err = run(capsys, "score", "--model", model_dir, "--input", doc, "--json",
                           "--per-token", fifo, *WINDOW)
    finally:
        done.set()
        reader.join(10)
        with contextlib.suppress(BlockingIOError):
            received.extend(os.read(fd, 1 << 20))
        os.close(fd)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    rows = [json.loads(line) for line in received.decode().splitlines()]
    assert len(rows) == json.loads(out)["num_tokens"] + 1  # the first token is not scored
    assert set(os.listdir(tmp_path)) == {"docs.jsonl", "tokens.fifo"}
