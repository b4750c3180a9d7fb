"""`pplfast score-corpus` streams: its peak memory stays within noise when the corpus grows
tenfold, where a reader that holds every record at once (the live control) grows by about the
corpus size. Each figure is measured in a fresh process (:mod:`memory_harness`).

One figure by hand:
    python tests/memory/memory_harness.py tests/memory/test_corpus_memory.py measure \\
        command=score-corpus model=DIR 'inputs=["A.jsonl", "B.jsonl"]' warmup=A.jsonl
"""
import os

import pytest

from builders import documents, save_trained_llama, write_jsonl
from memory_harness import in_child, peak_growth

pytest.importorskip("transformers")


def measure(command, model, inputs, warmup):
    """In this process: peak resident growth of one ``pplfast COMMAND`` run per input file,
    after a warm-up run on ``warmup``; ``read-whole`` (the live control) holds every record of
    the file at once, as a reader that does not stream would."""
    import contextlib
    import io
    import tempfile

    from pplfast.cli import main
    from pplfast.corpus.io import iter_documents

    def once(path, out):
        if command == "read-whole":
            return list(iter_documents([path], keep_record=True))
        argv = [command, "--model", model, "--input", path, "--no-progress", "--json",
                "--window", "64", "--mode", "chunks"]
        argv += ["--output", out, "--batch-tokens", "512"] if command == "score-corpus" else ["--batch-size", "32"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        once(warmup, os.path.join(tmp, "warm.jsonl"))
        for i, path in enumerate(inputs):
            held, growth = peak_growth(lambda: once(path, os.path.join(tmp, f"run{i}.jsonl")))
            results.append({"input": path, "peak_growth": growth})
            del held
    return results


def test_memory_flat_when_the_corpus_grows_tenfold(tmp_path):
    save_trained_llama(tmp_path / "model")
    docs = documents(600, seed=11, lines=(1, 2))
    # records carry metadata beside the text, as crawled corpora do: bytes to read, not to score
    records = [{"text": t, "meta": f"{i:06d}" * 2500} for i, t in enumerate(docs)]
    warm, small, large = tmp_path / "warm.jsonl", tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_jsonl(warm, records[:4])
    write_jsonl(small, records[:60])
    write_jsonl(large, records)
    args = dict(model=str(tmp_path / "model"), inputs=[str(small), str(large)])
    # glibc hands freed blocks back at once, so one run's leftovers hide less of the next one's
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "65536"}
    # both measured after a warm-up, the small corpus first; ours warms up on the small corpus
    # (the same buffers, whose memory is reused), the control (every record held at once, as a
    # reader that does not stream holds them) on four documents
    ours_small, ours_large = in_child(__file__, "measure", env=env, command="score-corpus",
                                      warmup=str(small), **args)
    control_small, control_large = in_child(__file__, "measure", env=env, command="read-whole",
                                            warmup=str(warm), **args)
    control = control_large["peak_growth"] - control_small["peak_growth"]
    ours = ours_large["peak_growth"] - ours_small["peak_growth"]
    corpus_bytes = os.path.getsize(large)
    # control: holding every record grows with the corpus, by about its size (less the JSON
    # syntax), twice the bound below at least
    assert control >= corpus_bytes / 2, (control_small, control_large)
    # ours stays within the probe's noise (about a MiB), far below the control
    assert ours <= corpus_bytes / 4, (ours_small, ours_large, control_small, control_large, corpus_bytes)
