"""``pplfast score-corpus`` and ``pplfast filter``: score a corpus per document, keep a band.

``score-corpus`` streams documents from ``--input`` (files, directories, globs; see
:mod:`pplfast.corpus_io`), scores them a buffer at a time with :class:`pplfast.CorpusScorer`,
appends one row per document to ``--output`` as it goes, and at the end sets each row's
``outlier`` flag (robust z of its log-perplexity over the run) and prints the summary.
``filter`` joins a corpus with its score rows by id and writes the documents inside a band.
"""
from __future__ import annotations

import argparse
import contextlib
import heapq
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

from ._dispatch import BACKENDS, BackendUnavailableError
from ._models import ModelLoadError, check_model_dir
from ._models import first_line as _first_line
from .corpus import DTYPES, NUM_EXTREME, SCORE_COLUMNS, STATS_COLUMNS, RunStats
from ._version import __version__
from .corpus_io import (
    FORMATS, JSON_SUFFIXES, ON_ERROR, CorpusIOError, IdIndex, RecordCheck, RowAppender,
    atomic_output, check_output, check_outputs, dump_row, expand_inputs, iter_documents,
    iter_score_rows, lock_outputs, remove_stale_temporaries, repair_tail, write_parquet,
)
from .windows import MODES

_BUFFER_DOCUMENTS = 1024
# documents are scored a buffer at a time: up to 1024 documents or about eight forward passes of
# text (batch_tokens at ~4 characters a token); larger buffers pack a little tighter
_BUFFER_PASSES = 8
SETTINGS_SUFFIX = ".settings"  # SCORES.jsonl.settings: how the rows of SCORES.jsonl were scored
# the settings a resumed run must share with the run that wrote the rows, with their options
RESUME_SETTINGS = (("model", "--model"), ("window", "--window"), ("stride", "--stride"),
                   ("mode", "--mode"), ("stats", "--stats"), ("text_field", "--text-field"),
                   ("id_field", "--id-field"), ("format", "--format"), ("dtype", "--dtype"))


class CorpusError(Exception):
    """A user mistake, reported in one line without a traceback."""


# ---------------------------------------------------------------- arguments

def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.prog.split()[-1] == "filter":
        _add_filter_arguments(parser)
    else:
        _add_score_arguments(parser)


def _add_score_arguments(parser):
    parser.add_argument("--model", required=True, help="local model directory or hub id")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="files (JSON lines or a JSON array: .jsonl, .json, .ndjson; .txt: "
                             "one document per file; each optionally .gz; .parquet), "
                             "directories or globs")
    parser.add_argument("--output", required=True, metavar="SCORES.jsonl",
                        help="score rows: .jsonl or .parquet (with --ray: a directory)")
    parser.add_argument("--text-field", default="text", help="field holding the text (default text)")
    parser.add_argument("--id-field", default=None,
                        help="field holding each document's id (default <file>:<line>)")
    parser.add_argument("--window", type=int, default=None,
                        help="most tokens per window (default: the model's context length)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding mode: tokens between window starts (default window // 2)")
    parser.add_argument("--mode", choices=MODES, default="sliding", help="window schedule (default sliding)")
    parser.add_argument("--batch-tokens", type=int, default=16384,
                        help="most tokens per forward pass, padding included (default 16384)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model weights: auto = checkpoint dtype on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--backend", default="auto", help="pplfast backend (default auto)")
    parser.add_argument("--stats", action="store_true", help="also sum_entropy and top1_hits per document")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip the ids already in --output "
                             "(refused when a setting differs from that run's)")
    parser.add_argument("--outlier-z", type=float, default=3.5,
                        help="flag documents whose log-perplexity is more than this many robust "
                             "standard deviations from the median (default 3.5)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_reading_arguments(parser)
    parser.add_argument("--ray", action="store_true", help="score with Ray Data (pplfast[ray])")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local instance)")
    parser.add_argument("--workers", type=int, default=1, help="--ray: scoring actors (default 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="--ray: GPUs per actor (default 0)")


def _add_filter_arguments(parser):
    parser.add_argument("--input", required=True, nargs="+", metavar="CORPUS",
                        help="the corpus that was scored (same paths as for score-corpus)")
    parser.add_argument("--scores", required=True, nargs="+", metavar="SCORES",
                        help="score rows from score-corpus (.jsonl, .parquet or a directory)")
    parser.add_argument("--output", required=True, metavar="KEPT.jsonl", help="documents kept (.jsonl or .jsonl.gz)")
    parser.add_argument("--rejected", default=None, metavar="REJECTED.jsonl",
                        help="documents not kept, unscored ones included")
    band = parser.add_mutually_exclusive_group(required=True)
    band.add_argument("--max-perplexity", type=float, default=None, metavar="X", help="keep value <= X")
    band.add_argument("--min-perplexity", type=float, default=None, metavar="X", help="keep value >= X")
    band.add_argument("--percentile-band", default=None, metavar="LO:HI",
                      help="keep the documents between these percentiles of all scored documents")
    parser.add_argument("--by", choices=("perplexity", "bits_per_byte"), default="perplexity",
                        help="the column the band applies to (default perplexity)")
    parser.add_argument("--id-field", default=None, help="as in score-corpus (default <file>:<line>)")
    parser.add_argument("--text-field", default="text", help="as in score-corpus (names the text of .txt files)")
    _add_reading_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")


def _add_reading_arguments(parser):
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="kind of every input file: auto = from its name (jsonl: JSON lines "
                             "or a JSON array)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="a record that cannot be read (malformed JSON, undecodable bytes, "
                             "no text, a bad or repeated id): stop (fail, the default), or skip "
                             "it and list it in --errors")
    parser.add_argument("--errors", default=None, metavar="ERRORS.jsonl",
                        help="with --on-error skip: where the skipped records go, one JSON line "
                             "each (file, line, reason)")


def run(args) -> int:
    name = args.command
    try:
        return _filter(args) if name == "filter" else _score_corpus(args)
    except (CorpusError, CorpusIOError, ModelLoadError) as exc:
        print(f"pplfast {name}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pplfast {name}: interrupted" + (
            "; finished rows are saved, rerun with --resume to continue" if name != "filter" else ""),
            file=sys.stderr)
        return 130


# ---------------------------------------------------------------- score-corpus

def _score_columns(stats: bool):
    return [name for name, _ in SCORE_COLUMNS] + ([name for name, _ in STATS_COLUMNS] if stats else [])


def _check_reading_args(args):
    if args.on_error == "skip" and not args.errors:
        raise CorpusError("--on-error skip needs --errors FILE: the skipped records are listed there")
    if args.errors and args.on_error != "skip":
        raise CorpusError("--errors lists the records that --on-error skip skips: pass "
                          "--on-error skip too")


def _check_score_args(args):
    for name in ("window", "stride", "batch_tokens", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CorpusError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.backend not in BACKENDS:
        raise CorpusError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if not (args.outlier_z > 0):
        raise CorpusError(f"--outlier-z must be positive, got {args.outlier_z}")
    if args.gpus_per_worker < 0:
        raise CorpusError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    out = args.output.lower()
    if not args.ray and not (out.endswith(".jsonl") or out.endswith(".parquet")):
        raise CorpusError(f"--output must end in .jsonl or .parquet, got {args.output!r}")
    _check_reading_args(args)


def _make_scorer(args, model):
    from .corpus import CorpusScorer

    try:
        return CorpusScorer(model, window=args.window, stride=args.stride, mode=args.mode,
                            batch_tokens=args.batch_tokens, text_field=args.text_field,
                            stats=args.stats, device=args.device, dtype=args.dtype,
                            backend=args.backend)
    except (ValueError, TypeError) as exc:
        raise CorpusError(str(exc)) from None


def _errors_output(args):
    """The ``--errors`` file, written whole at the end of the run (None without it)."""
    if not args.errors:
        return contextlib.nullcontext(None)
    return atomic_output(args.errors, label="--errors")


def _score_corpus(args) -> int:
    _check_score_args(args)
    files = expand_inputs(args.input, args.format)
    if args.ray:
        return _score_corpus_ray(args, files)
    parquet = args.output.lower().endswith(".parquet")
    rows_path = args.output + ".partial.jsonl" if parquet else args.output
    settings_path = args.output + SETTINGS_SUFFIX
    outputs = [("--output", args.output), ("--output", rows_path if parquet else None),
               ("the settings file", settings_path), ("--errors", args.errors)]
    check_outputs(outputs, [("--input", f) for f in files])
    if not check_output("--output", args.output).regular:
        raise CorpusError(f"--output {args.output!r} is not a regular file: the rows are read "
                          "back at the end of the run")
    with lock_outputs(outputs):  # a second run on this --output fails at once
        return _score_corpus_locked(args, files, parquet, rows_path, settings_path)


def _score_corpus_locked(args, files, parquet, rows_path, settings_path) -> int:
    done = IdIndex()  # ids in the output before this run
    settings = _settings(args)
    resumed = os.path.exists(args.output) or os.path.exists(rows_path)
    if resumed and not args.resume:
        existing = args.output if os.path.exists(args.output) else rows_path
        raise CorpusError(f"{existing!r} exists: pass --resume to continue that run, or remove it")
    if resumed:
        recorded = _recorded_settings(args.output, settings_path)
        _compare_settings(args.output, recorded, settings)
    check_model_dir(args.model)
    for path in (args.output, rows_path, settings_path, args.errors):
        if path is not None:
            remove_stale_temporaries(path)  # left by a run killed while it renamed its output
    if resumed:
        _prepare_resume(args.output, rows_path, parquet, done)
    scorer = _make_scorer(args, args.model)
    scorer.model  # load now: a bad model is reported before any document is read
    settings["dtype"] = str(next(scorer.model.parameters()).dtype).replace("torch.", "")
    if resumed:
        _compare_settings(args.output, recorded, settings)
    else:
        with atomic_output(settings_path, label="the settings file") as f:
            f.write(json.dumps({"command": "score-corpus", "pplfast_version": __version__,
                                **settings}, indent=2) + "\n")
    columns = _score_columns(args.stats)
    bar = _progress(args)
    documents = tokens = 0
    start = time.perf_counter()
    with _errors_output(args) as errors:
        check = RecordCheck(args.on_error,
                            None if errors is None else lambda e: errors.write(dump_row(e.as_row())))
        writer = RowAppender(rows_path)
        try:
            buffer, chars = [], 0
            for doc in iter_documents(files, text_field=args.text_field, id_field=args.id_field,
                                      fmt=args.format, check=check):
                if doc.id in done:
                    continue
                buffer.append(doc)
                chars += len(doc.text)
                if len(buffer) >= _BUFFER_DOCUMENTS or chars >= _BUFFER_PASSES * 4 * args.batch_tokens:
                    tokens += _score_buffer(scorer, buffer, columns, writer, bar)
                    documents += len(buffer)
                    buffer, chars = [], 0
            if buffer:
                tokens += _score_buffer(scorer, buffer, columns, writer, bar)
                documents += len(buffer)
        except (ValueError, BackendUnavailableError) as exc:
            if isinstance(exc, CorpusIOError):
                raise
            raise CorpusError(str(exc).splitlines()[0]) from None
        finally:
            writer.close()
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - start
    summary = _finish(args.output, rows_path, parquet, columns, args.outlier_z,
                      seconds=seconds, documents=documents, tokens=tokens)
    _print_summary(args, {**summary, "num_skipped": check.skipped})
    return 0


def _settings(args) -> dict:
    """What makes a row what it is (the dtype is added once the model is loaded)."""
    model = os.path.realpath(args.model) if os.path.isdir(args.model) else args.model
    return {"model": model, "window": args.window, "stride": args.stride, "mode": args.mode,
            "stats": args.stats, "text_field": args.text_field, "id_field": args.id_field,
            "format": args.format}


def _recorded_settings(output, path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"cannot resume {output!r}: its settings file {path!r} is missing, so "
                          "nothing shows how its rows were scored; write to a new --output") from None
    except (OSError, ValueError) as exc:
        raise CorpusError(f"cannot resume {output!r}: its settings file {path!r} is unreadable "
                          f"({_first_line(exc)})") from None
    if not isinstance(recorded, dict):
        raise CorpusError(f"cannot resume {output!r}: {path!r} is not a settings file")
    return recorded


def _compare_settings(output, recorded, settings):
    def show(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return "not given" if value is None else repr(value)

    for key, option in RESUME_SETTINGS:
        if key in settings and recorded.get(key) != settings[key]:
            what = (f"the weights are {settings[key]} now but were {recorded.get(key)}"
                    if key == "dtype" else
                    f"{option} is {show(settings[key])} now but was {show(recorded.get(key))}")
            raise CorpusError(f"--resume: {what} in the run that wrote {output!r}: resume with "
                              f"that run's {option}, or write to a new --output")


def _prepare_resume(output, rows_path, parquet, done):
    """Fill ``done`` with the ids already scored; a finished parquet file is reopened as rows."""
    if parquet and os.path.exists(output) and not os.path.exists(rows_path):
        with atomic_output(rows_path) as f:
            for row in iter_score_rows(output):
                f.write(dump_row(row))
    if not os.path.exists(rows_path):
        return
    repair_tail(rows_path)
    for row in iter_score_rows(rows_path):
        if not done.add(row["id"]):
            raise CorpusError(f"{rows_path!r} holds id {row['id']!r} twice: not a pplfast score file")


def _progress(args):
    if args.no_progress or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(unit="doc", desc="scoring", file=sys.stderr, leave=False, dynamic_ncols=True)


def _score_buffer(scorer, buffer, columns, writer, bar) -> int:
    scores = scorer.score_texts([doc.text for doc in buffer])
    for i, doc in enumerate(buffer):
        row = {"id": doc.id}
        for name in columns:
            row[name] = scores[name][i].item()
        row["outlier"] = None  # set once the whole run is known
        writer.write(row)
    writer.flush()
    tokens = int(scores["num_tokens"].sum())
    if bar is not None:
        bar.update(len(buffer))
        elapsed = bar.format_dict.get("elapsed") or 0
        bar.total_tokens = getattr(bar, "total_tokens", 0) + tokens
        if elapsed > 0:
            bar.set_postfix_str(f"{bar.total_tokens / elapsed:,.0f} tokens/s", refresh=True)
    return tokens


def _finish(output, rows_path, parquet, columns, outlier_z, *, seconds, documents, tokens):
    """Second pass over the rows: outlier flags from the whole run, then the summary."""
    stats = RunStats()
    for row in iter_score_rows(rows_path):
        stats.add(row["num_tokens"], row["sum_nll"], row["num_bytes"])
    extreme = []  # a heap of the NUM_EXTREME largest |z| among the outliers
    count = 0

    def flagged_rows():
        nonlocal count
        for row in iter_score_rows(rows_path):
            z = float(stats.z_scores(row["num_tokens"], row["sum_nll"]))
            row["outlier"] = bool(abs(z) > outlier_z)  # NaN (nothing scored): False
            if row["outlier"]:
                count += 1
                item = (abs(z), row["id"])
                if len(extreme) < NUM_EXTREME:
                    heapq.heappush(extreme, item)
                else:
                    heapq.heappushpop(extreme, item)
            yield row

    if parquet:
        kinds = {name: ("int" if np.dtype(dtype).kind == "i" else "float")
                 for name, dtype in SCORE_COLUMNS + STATS_COLUMNS}
        schema = [("id", "str")] + [(c, kinds[c]) for c in columns] + [("outlier", "bool")]
        write_parquet(output, flagged_rows(), schema)
        os.unlink(rows_path)
    else:
        with atomic_output(output) as f:
            for row in flagged_rows():
                f.write(dump_row(row))
    outliers = [doc_id for _, doc_id in sorted(extreme, reverse=True)]
    return stats.summary(num_outliers=count, outliers=outliers, seconds=seconds,
                         documents=documents, tokens=tokens)


def _fmt(value, spec=".4f"):
    return "n/a" if value is None else format(value, spec)


def _print_summary(args, summary):
    summary = {"output": args.output, **summary}
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    pct = summary["perplexity_percentiles"]
    rows = [
        ("output", summary["output"]),
        ("documents", f"{summary['num_documents']} ({summary['num_scored_documents']} with scored "
                      f"tokens, {summary['documents_this_run']} this run)"),
        ("tokens scored", str(summary["num_tokens"])),
        ("perplexity", _fmt(summary["perplexity"])),
        ("bits per byte", _fmt(summary["bits_per_byte"])),
        ("documents/s", _fmt(summary["documents_per_second"], ".1f")),
        ("tokens/s", _fmt(summary["tokens_per_second"], ".1f")),
        ("perplexity p1..p99", "  ".join(f"p{p}={_fmt(v, '.2f')}" for p, v in pct.items())),
        ("outliers", f"{summary['num_outliers']} (|z| > {args.outlier_z})"
                     + (": " + ", ".join(summary["outliers"]) if summary["outliers"] else "")),
    ]
    if args.on_error == "skip":
        rows.append(("skipped records", f"{summary['num_skipped']} (listed in {args.errors})"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _score_corpus_ray(args, files):
    """``--ray``: pplfast's reader in Ray tasks (the single-process run's ids, rules and errors),
    scoring on an actor pool, Ray's writers for the output directory."""
    if args.resume:
        raise CorpusError("--resume is not supported with --ray: write to a new --output directory")
    outputs = [("--output", args.output), ("--errors", args.errors)]
    if os.path.exists(args.output):
        raise CorpusError(f"{args.output!r} exists: choose a new --output directory")
    check_outputs(outputs, [("--input", f) for f in files])
    from ._optional import require

    try:
        ray = require("ray", extra="ray", feature="--ray")
    except ImportError as exc:
        raise CorpusError(str(exc)) from None
    from .ray import check_model

    with lock_outputs(outputs):
        if os.path.exists(args.output):  # made by a run that held the lock until now
            raise CorpusError(f"{args.output!r} exists: choose a new --output directory")
        _make_scorer(args, args.model)  # bad options fail here, before Ray starts
        check_model(args.model)  # and a model that would not load in the actors
        if not ray.is_initialized():
            ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not args.no_progress
        try:
            return _run_ray(args, files, ray)
        except ray.exceptions.RayError as exc:
            # a worker's error (a model that does not load after all): its own first line
            raise CorpusError(_worker_error_line(exc)) from None


def _worker_error_line(exc) -> str:
    """The first line of the error a Ray worker raised, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _first_line(cause)
    # an actor that died in __init__: Ray keeps only the text, whose last "Type: message"
    # line is the worker's own
    for line in reversed(str(exc).splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum() and head.endswith(("Error", "Exception")):
            return message.strip()
    return _first_line(exc)


def _run_ray(args, files, ray):
    from .ray import add_outlier_flags, read_corpus, score_dataset

    start = time.perf_counter()
    id_column = "id" if args.text_field != "id" else "_id"
    skipped = 0
    with _errors_output(args) as errors:
        def on_skip(error):
            nonlocal skipped
            skipped += 1
            errors.write(dump_row(error.as_row()))

        ds = read_corpus(files, text_field=args.text_field, id_field=args.id_field,
                         fmt=args.format, on_error=args.on_error,
                         on_skip=on_skip if errors is not None else None, id_column=id_column)
    columns = _score_columns(args.stats)
    scored = score_dataset(
        ds, args.model, concurrency=args.workers, num_gpus=args.gpus_per_worker,
        window=args.window, stride=args.stride, mode=args.mode, batch_tokens=args.batch_tokens,
        text_field=args.text_field, stats=args.stats, device=args.device, dtype=args.dtype,
        backend=args.backend,
    )
    scored = scored.select_columns([id_column] + columns)
    if id_column != "id":
        scored = scored.rename_columns({id_column: "id"})
    scored = scored.materialize()  # score rows only (no text): read twice below
    stats = RunStats()
    for batch in scored.iter_batches(batch_format="numpy",
                                     batch_size=65536):
        stats.add_arrays(batch["num_tokens"], batch["sum_nll"], batch["num_bytes"])
    final = add_outlier_flags(scored, stats, args.outlier_z).select_columns(
        ["id"] + columns + ["outlier"]).materialize()
    extreme, count = [], 0
    for batch in final.iter_batches(batch_format="numpy", batch_size=65536):
        z = np.abs(stats.z_scores(batch["num_tokens"], batch["sum_nll"]))
        for i in np.flatnonzero(batch["outlier"]):
            count += 1
            item = (float(z[i]), str(batch["id"][i]))
            (heapq.heappush if len(extreme) < NUM_EXTREME else heapq.heappushpop)(extreme, item)
    output = os.path.abspath(args.output)  # Ray's writers run in workers, elsewhere
    if args.output.lower().endswith(".parquet"):
        final.write_parquet(output)
    else:
        final.write_json(output, double_precision=15)  # pandas' default keeps 10 digits
    seconds = time.perf_counter() - start
    summary = stats.summary(num_outliers=count, outliers=[i for _, i in sorted(extreme, reverse=True)],
                            seconds=seconds, documents=stats.num_documents, tokens=stats.num_tokens)
    _print_summary(args, {**summary, "num_skipped": skipped})
    return 0


# ---------------------------------------------------------------- filter

def _band(args):
    if args.percentile_band is not None:
        try:
            lo, hi = (float(x) for x in args.percentile_band.split(":"))
        except ValueError:
            raise CorpusError(f"--percentile-band must be LO:HI (e.g. 30:60), got {args.percentile_band!r}") from None
        if not (0 <= lo < hi <= 100):
            raise CorpusError(f"--percentile-band needs 0 <= LO < HI <= 100, got {args.percentile_band!r}")
        return "percentile", lo, hi
    value = args.max_perplexity if args.max_perplexity is not None else args.min_perplexity
    flag = "--max-perplexity" if args.max_perplexity is not None else "--min-perplexity"
    if not math.isfinite(value) or value < 0:
        raise CorpusError(f"{flag} must be a finite number >= 0, got {value}")
    return ("max", None, value) if args.max_perplexity is not None else ("min", value, None)


def _check_filter_output(flag, path):
    if not check_output(flag, path).regular:
        return  # /dev/stdout, a FIFO: written as they are
    if not path.lower().endswith(JSON_SUFFIXES):
        raise CorpusError(f"{flag} {path!r}: filter writes JSON lines; name it .jsonl or "
                          ".jsonl.gz (.json and .json.gz are read as JSON lines too)")


def _filter(args) -> int:
    kind, lo, hi = _band(args)
    _check_reading_args(args)
    outputs = [("--output", args.output), ("--rejected", args.rejected), ("--errors", args.errors)]
    for flag, path in outputs[:2]:
        if path is not None:
            _check_filter_output(flag, path)
    files = expand_inputs(args.input, args.format)
    score_files = expand_inputs(args.scores, option="--scores")
    check_outputs(outputs, [("--input", f) for f in files] + [("--scores", f) for f in score_files])
    with lock_outputs(outputs):
        return _filter_locked(args, kind, lo, hi, files, score_files)


def _filter_locked(args, kind, lo, hi, files, score_files) -> int:
    for path in (args.output, args.rejected, args.errors):
        if path is not None:
            remove_stale_temporaries(path)  # left by a run killed while it renamed its output
    scores = {}
    for path in score_files:
        for row in iter_score_rows(path):
            if args.by not in row:
                raise CorpusError(f"{path}: score rows have no column {args.by!r}")
            if row["id"] in scores:
                raise CorpusError(f"{path}: id {row['id']!r} is scored twice")
            scores[row["id"]] = row
    values = np.array([r[args.by] for r in scores.values()], dtype=np.float64)
    values = values[np.isfinite(values)]
    if kind == "percentile":
        if len(values) == 0:
            raise CorpusError("no scored document: a percentile band is undefined")
        lo_value, hi_value = (float(v) for v in np.percentile(values, [lo, hi]))
        keep = (lambda v: lo_value <= v <= hi_value) if hi == 100 else (lambda v: lo_value <= v < hi_value)
    else:
        lo_value, hi_value = lo, hi
        keep = (lambda v: v <= hi_value) if kind == "max" else (lambda v: v >= lo_value)
    missing, sample = 0, []
    kept = rejected = unscored = 0
    with atomic_output(args.output, label="--output") as out_kept, \
            _maybe_output(args.rejected, "--rejected") as out_rejected, \
            _errors_output(args) as errors:
        # the records score-corpus --on-error skip skipped are the ones this same reader skips
        # here: unscored, listed in --errors, in neither --output nor --rejected
        check = RecordCheck(args.on_error,
                            None if errors is None else lambda e: errors.write(dump_row(e.as_row())))
        for doc in iter_documents(files, text_field=args.text_field, id_field=args.id_field,
                                  fmt=args.format, keep_record=True, check=check):
            row = scores.pop(doc.id, None)
            if row is None:
                missing += 1
                if len(sample) < 3:
                    sample.append(doc.id)
                continue
            value = row[args.by]
            ok = isinstance(value, (int, float)) and math.isfinite(value) and keep(value)
            unscored += not (isinstance(value, (int, float)) and math.isfinite(value))
            record = {**doc.record, "pplfast": row}
            if ok:
                kept += 1
                out_kept.write(dump_row(record))
            else:
                rejected += 1
                if out_rejected is not None:
                    out_rejected.write(dump_row(record))
        if missing:
            raise CorpusError(f"{missing} documents of the corpus have no score row (e.g. "
                              f"{', '.join(map(repr, sample))}): the scores are of another corpus "
                              "or an unfinished run (finish it with score-corpus --resume)")
        if scores:
            extra = list(scores)[:3]
            raise CorpusError(f"{len(scores)} score rows have ids not in the corpus (e.g. "
                              f"{', '.join(map(repr, extra))}): the scores are of another corpus "
                              "or another --id-field")
    figures = {"num_documents": kept + rejected, "num_kept": kept, "num_rejected": rejected,
               "num_unscored": unscored, "num_skipped": check.skipped, "by": args.by,
               "low": lo_value, "high": hi_value}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        band = (f"{_fmt(lo_value)} <= {args.by}" if lo_value is not None else args.by) + (
            f" {'<=' if kind != 'percentile' or hi == 100 else '<'} {_fmt(hi_value)}" if hi_value is not None else "")
        print(f"kept {kept} of {kept + rejected} documents ({band}); rejected {rejected}, "
              f"{unscored} of them unscored"
              + (f"; skipped {check.skipped} unreadable records (listed in {args.errors})"
                 if args.on_error == "skip" else ""))
    return 0


def _maybe_output(path, label):
    return atomic_output(path, label=label) if path else contextlib.nullcontext(None)
