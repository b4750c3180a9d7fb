"""pplfast.ray.score_dataset and `pplfast score-corpus --ray` on a local Ray instance (2 CPUs,
loopback only, started once for this module): the same scores as the single-process run."""
import gzip
import json
import math
import os
import random
import sys

import pytest

pytest.importorskip("transformers")
ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from builders import corpus, save_tiny_llama  # noqa: E402
from pplfast import CorpusScorer  # noqa: E402
from pplfast.corpus.io import iter_score_rows  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model, tokenizer = save_tiny_llama(root)
    rng = random.Random(0)
    texts = [" ".join(corpus(rng.randint(1, 8), seed=500 + i)) for i in range(40)] + ["", "  "]
    records = [{"text": t, "doc": f"d{i:02d}"} for i, t in enumerate(texts)]
    return root, model, tokenizer, records


def assert_same_rows(rows, single, figures):
    """Each Ray row equals the single-process row of its id: the same columns in the same order,
    tokens and outlier flag exactly, ``figures`` to 1e-5 (NaN where NaN)."""
    for row in rows:
        ref = single[row["id"]]
        assert list(row) == list(ref)
        assert row["num_tokens"] == ref["num_tokens"] and row["outlier"] == ref["outlier"]
        for key in figures:
            if math.isnan(ref[key]):
                assert math.isnan(row[key])
            else:
                assert row[key] == pytest.approx(ref[key], rel=1e-5), (row["id"], key)


def test_score_dataset_equals_single_process(local_ray, saved):
    from pplfast.ray import score_dataset

    root, model, tokenizer, records = saved
    ds = ray.data.from_items(records)
    out = score_dataset(ds, str(root / "model"), concurrency=1, batch_size=8, window=32,
                        batch_tokens=128).take_all()
    assert len(out) == len(records)
    single = CorpusScorer(model, tokenizer, window=32, batch_tokens=4096).score_texts(
        [r["text"] for r in records])
    by_id = {row["doc"]: row for row in out}
    for i, record in enumerate(records):
        row = by_id[record["doc"]]
        assert row["text"] == record["text"]
        assert row["num_tokens"] == single["num_tokens"][i]
        assert row["num_bytes"] == single["num_bytes"][i] and row["num_words"] == single["num_words"][i]
        if single["num_tokens"][i] == 0:
            assert math.isnan(row["perplexity"])
            continue
        for key in ("sum_nll", "sum_nll_sq", "perplexity", "bits_per_byte"):
            assert row[key] == pytest.approx(single[key][i], rel=1e-5), (record["doc"], key)


def test_cli_ray_equals_single_process_run(local_ray, saved, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pplfast.cli import main

    root, _, _, records = saved
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in records[:25]:
            f.write(json.dumps(r) + "\n")
    pq.write_table(pa.Table.from_pylist(records[25:]), tmp_path / "b.parquet")
    inputs = [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet")]
    common = ["--model", str(root / "model"), "--input", *inputs, "--id-field", "doc",
              "--window", "32", "--batch-tokens", "128", "--json", "--no-progress"]
    assert main(["score-corpus", *common, "--output", str(tmp_path / "single.jsonl")]) == 0
    single_summary = json.loads(capsys.readouterr().out)
    assert main(["score-corpus", *common, "--ray", "--workers", "1", "--output", str(tmp_path / "ray-out")]) == 0
    ray_summary = json.loads(capsys.readouterr().out)
    single = {r["id"]: r for r in iter_score_rows(str(tmp_path / "single.jsonl"))}
    files = sorted(os.listdir(tmp_path / "ray-out"))
    assert files and all(f.endswith(".json") for f in files)
    rows = [r for f in files for r in iter_score_rows(str(tmp_path / "ray-out" / f))]
    assert sorted(r["id"] for r in rows) == sorted(single)
    assert_same_rows(rows, single, ("sum_nll", "sum_nll_sq", "perplexity", "bits_per_byte"))
    for key in ("num_documents", "num_tokens", "num_outliers"):
        assert ray_summary[key] == single_summary[key]
    assert ray_summary["perplexity"] == pytest.approx(single_summary["perplexity"], rel=1e-6)
    assert ray_summary["perplexity_percentiles"] == pytest.approx(single_summary["perplexity_percentiles"], rel=1e-5)


def write_mixed_corpus(directory, records):
    """The records over four formats, read by their default ids: JSON lines with blank lines
    (numbered all the same), gzip, parquet and two .txt files; returns the names, relative."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps(r) + "\n" for r in records[:14]]
    lines[3:3] = ["\n", "  \n"]
    lines.insert(0, "\n")
    (directory / "a.jsonl").write_text("".join(lines), encoding="utf-8")
    with gzip.open(directory / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[14:26])
    pq.write_table(pa.Table.from_pylist(records[26:38]), directory / "c.parquet", row_group_size=5)
    (directory / "txt").mkdir()
    for i, r in enumerate(records[38:40]):
        (directory / "txt" / f"d{i}.txt").write_text(r["text"], encoding="utf-8")
    return ["a.jsonl", "b.jsonl.gz", "c.parquet", "txt"]


def test_read_corpus_default_ids_are_the_single_process_ids(local_ray, saved, tmp_path, monkeypatch):
    from pplfast.corpus.io import CorpusIOError, expand_inputs, iter_documents
    from pplfast.ray import read_corpus

    records = saved[3]
    names = write_mixed_corpus(tmp_path, records)
    monkeypatch.chdir(tmp_path)  # relative names: the workers open the absolute paths
    files = expand_inputs(names)
    want = [(d.id, d.text) for d in iter_documents(files)]
    assert want[0][0] == "a.jsonl:2" and "a.jsonl:7" in dict(want)  # blank lines counted
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "target_max_block_size", 512)  # a few rows per block
    ds = read_corpus(files, text_field="text").materialize()
    assert ds.num_blocks() > len(files)  # files split over blocks: the ids are numbered before
    got = [(row["id"], row["text"]) for row in ds.take_all()]
    assert sorted(got) == sorted(want)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{nope\n')
    with pytest.raises(CorpusIOError, match="bad.jsonl:3: not valid JSON"):
        read_corpus(["bad.jsonl"], text_field="text").materialize()


def test_cli_ray_default_ids_equal_single_process_run(local_ray, saved, tmp_path, capsys, monkeypatch):
    from pplfast.cli import main

    root, _, _, records = saved
    names = write_mixed_corpus(tmp_path, records)
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(root / "model"), "--input", *names, "--window", "32",
              "--batch-tokens", "128", "--json", "--no-progress"]
    assert main(["score-corpus", *common, "--output", "single.jsonl"]) == 0
    single_summary = json.loads(capsys.readouterr().out)
    assert main(["score-corpus", *common, "--ray", "--output", "ray-out"]) == 0
    ray_summary = json.loads(capsys.readouterr().out)
    single = {r["id"]: r for r in iter_score_rows("single.jsonl")}
    rows = [r for f in sorted(os.listdir("ray-out")) for r in iter_score_rows(os.path.join("ray-out", f))]
    assert len(single) == 40 and sorted(r["id"] for r in rows) == sorted(single)
    assert {"a.jsonl:2", "b.jsonl.gz:12", "c.parquet:12", os.path.join("txt", "d1.txt")} <= set(single)
    assert_same_rows(rows, single, ("sum_nll", "perplexity"))
    assert all(row["num_bytes"] == single[row["id"]]["num_bytes"] for row in rows)
    for key in ("num_documents", "num_tokens", "num_outliers"):
        assert ray_summary[key] == single_summary[key]
    # a worker's error is one line too
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{nope\n')
    assert main(["score-corpus", *common[:2], "--input", "bad.jsonl", "--ray", "--no-progress",
                 "--output", "bad-out"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("pplfast score-corpus: error: bad.jsonl:2: not valid "
                                            "JSON (Expecting property name enclosed in double quotes)")


def test_bad_arguments_and_missing_extra(local_ray, saved, monkeypatch):
    from pplfast import ray as pplfast_ray

    root = saved[0]
    ds = ray.data.from_items([{"text": "a"}])
    with pytest.raises(ValueError, match="concurrency must be a positive int, got 0"):
        pplfast_ray.score_dataset(ds, str(root / "model"), concurrency=0)
    with pytest.raises(ValueError, match="num_gpus must be a number >= 0"):
        pplfast_ray.score_dataset(ds, str(root / "model"), num_gpus=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        pplfast_ray.score_dataset(ds, str(root / "model"), mode="bogus")
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r'pip install "pplfast\[ray\]"'):
        pplfast_ray.score_dataset(ds, str(root / "model"))


def test_read_corpus_reads_every_kind_like_the_single_process_reader(local_ray, tmp_path):
    from pplfast.corpus.io import CorpusIOError, expand_inputs, iter_documents
    from pplfast.ray import read_corpus
    from builders import BAD_FILES, write_bad, write_every_kind

    paths, expected = write_every_kind(tmp_path)
    got = read_corpus(expand_inputs(paths), text_field="text").take_all()
    assert sorted((row["id"], row["text"]) for row in got) == sorted(expected)
    for name in BAD_FILES:
        bad = write_bad(tmp_path, name)
        with pytest.raises(CorpusIOError) as single:
            list(iter_documents([bad]))
        with pytest.raises(CorpusIOError) as on_ray:
            read_corpus([bad], text_field="text").materialize()
        assert str(on_ray.value) == str(single.value), name


def test_id_field_rules_and_errors_are_the_single_process_ones(local_ray, saved, tmp_path, capsys):
    from pplfast.cli import main
    from pplfast.corpus.io import CorpusIOError, iter_documents
    from pplfast.ray import read_corpus
    from builders import BAD_RECORDS, write_bad_corpus

    records = saved[3]
    # ids as the single-process reader makes them: ints as their digits, text files by name
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": r["text"], "doc": i if i % 2 else r["doc"]}) + "\n"
                            for i, r in enumerate(records[:6])), encoding="utf-8")
    (tmp_path / "t.txt").write_text(records[6]["text"], encoding="utf-8")
    files = [str(good), str(tmp_path / "t.txt")]
    want = [(d.id, d.text) for d in iter_documents(files, id_field="doc")]
    assert [i for i, _ in want] == ["d00", "1", "d02", "3", "d04", "5", str(tmp_path / "t.txt")]
    got = read_corpus(files, text_field="text", id_field="doc").take_all()
    assert sorted((r["id"], r["text"]) for r in got) == sorted(want)
    # each bad id is the same error, in the driver, before any scoring
    for value in (None, 12.0, True, [1], "dup"):
        bad = tmp_path / "bad.jsonl"
        rows = [{"text": "a", "doc": "dup"}, {"text": "b", "doc": value}]
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        with pytest.raises(CorpusIOError) as single:
            list(iter_documents([str(bad)], id_field="doc"))
        with pytest.raises(CorpusIOError) as on_ray:
            read_corpus([str(bad)], text_field="text", id_field="doc")
        assert str(on_ray.value) == str(single.value), value
    # --on-error skip: the same rows and the same --errors file with and without --ray
    inputs, expected = write_bad_corpus(tmp_path, [r["text"] for r in records[:8]])
    common = ["--model", str(saved[0] / "model"), "--input", *inputs, "--id-field", "doc",
              "--window", "32", "--batch-tokens", "128", "--no-progress", "--json",
              "--on-error", "skip"]
    assert main(["score-corpus", *common, "--output", str(tmp_path / "single.jsonl"),
                 "--errors", str(tmp_path / "single-errors.jsonl")]) == 0
    single = json.loads(capsys.readouterr().out)
    assert main(["score-corpus", *common, "--ray", "--output", str(tmp_path / "ray-out"),
                 "--errors", str(tmp_path / "ray-errors.jsonl")]) == 0
    on_ray = json.loads(capsys.readouterr().out)
    assert on_ray["num_skipped"] == single["num_skipped"] == len(BAD_RECORDS)
    assert on_ray["num_documents"] == single["num_documents"] == len(expected)
    with open(tmp_path / "single-errors.jsonl") as a, open(tmp_path / "ray-errors.jsonl") as b:
        assert a.read() == b.read()
    rows = [r for f in sorted(os.listdir(tmp_path / "ray-out"))
            for r in iter_score_rows(str(tmp_path / "ray-out" / f))]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in iter_score_rows(
        str(tmp_path / "single.jsonl"))) == sorted(r["doc"] for r in expected)


def broken_models(root, source):
    """Model directories every actor would fail to load: name -> path."""
    import shutil

    models = {}
    for name in ("no-weights", "cut-weights", "no-tokenizer", "bad-config"):
        path = root / name
        shutil.copytree(source, path)
        models[name] = path
    os.unlink(models["no-weights"] / "model.safetensors")
    data = (models["cut-weights"] / "model.safetensors").read_bytes()
    (models["cut-weights"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    for f in os.listdir(models["no-tokenizer"]):
        if f.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.unlink(models["no-tokenizer"] / f)
    (models["bad-config"] / "config.json").write_text("{broken")
    models["missing"] = root / "absent"
    return models


def test_a_broken_model_is_one_line_from_the_driver(local_ray, saved, tmp_path, capsys):
    from pplfast.cli import main
    from pplfast.corpus import ModelLoadError
    from pplfast.ray import score_dataset

    ds = ray.data.from_items([{"text": "a b c"}])
    models = broken_models(tmp_path, saved[0] / "model")
    for name, path in models.items():
        with pytest.raises(ModelLoadError) as single:
            CorpusScorer(str(path), window=16).model
        with pytest.raises(ModelLoadError) as on_ray:  # at once, not inside an actor later
            score_dataset(ds, str(path), window=16)
        assert str(on_ray.value) == str(single.value), name
    inp = tmp_path / "c.jsonl"
    inp.write_text('{"text": "a b c"}\n')
    lines = {}
    for flags in ([], ["--ray"]):
        out = tmp_path / ("ray-out" if flags else "s.jsonl")
        rc = main(["score-corpus", "--model", str(models["no-weights"]), "--input", str(inp),
                   "--output", str(out), "--window", "16", "--no-progress", *flags])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1, err
        lines[bool(flags)] = err.strip()
    assert lines[True] == lines[False] and "no file named model.safetensors" in lines[True]
