"""``pplfast score-corpus``: score a corpus per document, streamed and resumable.

Documents are streamed from ``--input`` (files, directories, globs; the reader of
:mod:`pplfast.corpus.io`), scored a buffer at a time with :class:`pplfast.CorpusScorer`, and one
row per document is appended to ``--output`` as it goes; at the end each row's ``outlier`` flag
(robust z of its log-perplexity over the run) is set and the summary printed. ``--resume``
continues a run whose settings match (``OUTPUT.settings``); ``--ray`` scores on Ray Data.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

from .._optional import require
from .._version import __version__
from ..api import BACKENDS, BackendUnavailableError
from ..corpus.ids import IdIndex
from ..corpus.io import CorpusIOError, RecordCheck, expand_inputs, iter_documents, iter_score_rows
from ..corpus.run_stats import Outliers, RunStats, write_flagged_rows
from ..corpus.ray_data import add_outlier_flags, check_model, read_corpus, score_dataset
from ..corpus.scorer import SCORE_COLUMNS, STATS_COLUMNS, CorpusScorer
from ..corpus.writer import (RowAppender, atomic_output, check_output, check_outputs, dump_row,
                             json_safe, lock_outputs, remove_stale_temporaries, repair_tail)
from ..models.loading import DTYPES, check_model_dir
from ..models.windows import MODES
from ._common import (CliError, add_reading_arguments, check_reading_arguments, device,
                      errors_output, first_line, fixed, key_values, one_line_errors)

_BUFFER_DOCUMENTS = 1024
# documents are scored a buffer at a time: up to 1024 documents or about eight forward passes of
# text (batch_tokens at ~4 characters a token); larger buffers pack a little tighter
_BUFFER_PASSES = 8
SETTINGS_SUFFIX = ".settings"  # SCORES.jsonl.settings: how the rows of SCORES.jsonl were scored
# the settings a resumed run must share with the run that wrote the rows, with their options
RESUME_SETTINGS = (("model", "--model"), ("window", "--window"), ("stride", "--stride"),
                   ("mode", "--mode"), ("stats", "--stats"), ("text_field", "--text-field"),
                   ("id_field", "--id-field"), ("format", "--format"), ("dtype", "--dtype"))



def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_reading_arguments(parser)
    parser.add_argument("--ray", action="store_true", help="score with Ray Data (pplfast[ray])")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local instance)")
    parser.add_argument("--workers", type=int, default=1, help="--ray: scoring actors (default 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="--ray: GPUs per actor (default 0)")




def _score_columns(stats: bool):
    return [name for name, _ in SCORE_COLUMNS] + ([name for name, _ in STATS_COLUMNS] if stats else [])




def _check_score_args(args):
    for name in ("window", "stride", "batch_tokens", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.backend not in BACKENDS:
        raise CliError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if not (args.outlier_z > 0):
        raise CliError(f"--outlier-z must be positive, got {args.outlier_z}")
    if args.gpus_per_worker < 0:
        raise CliError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    if not args.ray:  # with --ray, the actors' device (checked where they run)
        device(args.device)
    out = args.output.lower()
    if not args.ray and not (out.endswith(".jsonl") or out.endswith(".parquet")):
        raise CliError(f"--output must end in .jsonl or .parquet, got {args.output!r}")
    check_reading_arguments(args)


def _make_scorer(args, model):
    try:
        return CorpusScorer(model, window=args.window, stride=args.stride, mode=args.mode,
                            batch_tokens=args.batch_tokens, text_field=args.text_field,
                            stats=args.stats, device=args.device, dtype=args.dtype,
                            backend=args.backend)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None


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
        raise CliError(f"--output {args.output!r} is not a regular file: the rows are read "
                       "back at the end of the run")
    with lock_outputs(outputs):  # a second run on this --output fails at once
        return _score_corpus_locked(args, files, parquet, rows_path, settings_path)


def _score_corpus_locked(args, files, parquet, rows_path, settings_path) -> int:
    done = IdIndex()  # ids in the output before this run
    settings = _settings(args)
    resumed = os.path.exists(args.output) or os.path.exists(rows_path)
    if resumed and not args.resume:
        existing = args.output if os.path.exists(args.output) else rows_path
        raise CliError(f"{existing!r} exists: pass --resume to continue that run, or remove it")
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
    with errors_output(args) as errors:
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
            raise CliError(str(exc).splitlines()[0]) from None
        finally:
            writer.close()
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - start
    stats, outliers = write_flagged_rows(rows_path, args.output, columns, args.outlier_z,
                                         parquet=parquet)
    summary = stats.summary(num_outliers=outliers.count, outliers=outliers.most_extreme(),
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
        raise CliError(f"cannot resume {output!r}: its settings file {path!r} is missing, so "
                       "nothing shows how its rows were scored; write to a new --output") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot resume {output!r}: its settings file {path!r} is unreadable "
                       f"({first_line(exc)})") from None
    if not isinstance(recorded, dict):
        raise CliError(f"cannot resume {output!r}: {path!r} is not a settings file")
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
            raise CliError(f"--resume: {what} in the run that wrote {output!r}: resume with "
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
            raise CliError(f"{rows_path!r} holds id {row['id']!r} twice: not a pplfast score file")


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


def _print_summary(args, summary):
    summary = {"output": args.output, **summary}
    if args.json:
        # strict JSON: an infinite perplexity (or any non-finite figure) is null, as in the rows
        print(json.dumps(json_safe(summary), indent=2, ensure_ascii=False))
        return
    pct = summary["perplexity_percentiles"]
    rows = [
        ("output", summary["output"]),
        ("documents", f"{summary['num_documents']} ({summary['num_scored_documents']} with scored "
                      f"tokens, {summary['documents_this_run']} this run)"),
        ("tokens scored", str(summary["num_tokens"])),
        ("perplexity", fixed(summary["perplexity"])),
        ("bits per byte", fixed(summary["bits_per_byte"])),
        ("documents/s", fixed(summary["documents_per_second"], ".1f")),
        ("tokens/s", fixed(summary["tokens_per_second"], ".1f")),
        ("perplexity p1..p99", "  ".join(f"p{p}={fixed(v, '.2f')}" for p, v in pct.items())),
        ("outliers", f"{summary['num_outliers']} (|z| > {args.outlier_z})"
                     + (": " + ", ".join(summary["outliers"]) if summary["outliers"] else "")),
    ]
    if args.on_error == "skip":
        rows.append(("skipped records", f"{summary['num_skipped']} (listed in {args.errors})"))
    print(key_values(rows))


def _score_corpus_ray(args, files):
    """``--ray``: pplfast's reader in Ray tasks (the single-process run's ids, rules and errors),
    scoring on an actor pool, Ray's writers for the output directory."""
    if args.resume:
        raise CliError("--resume is not supported with --ray: write to a new --output directory")
    outputs = [("--output", args.output), ("--errors", args.errors)]
    if os.path.exists(args.output):
        raise CliError(f"{args.output!r} exists: choose a new --output directory")
    check_outputs(outputs, [("--input", f) for f in files])
    try:
        ray = require("ray", extra="ray", feature="--ray")
    except ImportError as exc:
        raise CliError(str(exc)) from None
    with lock_outputs(outputs):
        if os.path.exists(args.output):  # made by a run that held the lock until now
            raise CliError(f"{args.output!r} exists: choose a new --output directory")
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
            raise CliError(_worker_error_line(exc)) from None


def _worker_error_line(exc) -> str:
    """The first line of the error a Ray worker raised, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return first_line(cause)
    # an actor that died in __init__: Ray keeps only the text, whose last "Type: message"
    # line is the worker's own
    for line in reversed(str(exc).splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum() and head.endswith(("Error", "Exception")):
            return message.strip()
    return first_line(exc)


def _run_ray(args, files, ray):
    start = time.perf_counter()
    id_column = "id" if args.text_field != "id" else "_id"
    skipped = 0
    with errors_output(args) as errors:
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
    outliers = Outliers()
    for batch in final.iter_batches(batch_format="numpy", batch_size=65536):
        z = np.abs(stats.z_scores(batch["num_tokens"], batch["sum_nll"]))
        for i in np.flatnonzero(batch["outlier"]):
            outliers.add(float(z[i]), str(batch["id"][i]))
    output = os.path.abspath(args.output)  # Ray's writers run in workers, elsewhere
    if args.output.lower().endswith(".parquet"):
        final.write_parquet(output)
    else:
        final.write_json(output, double_precision=15)  # pandas' default keeps 10 digits
    seconds = time.perf_counter() - start
    summary = stats.summary(num_outliers=outliers.count, outliers=outliers.most_extreme(),
                            seconds=seconds, documents=stats.num_documents, tokens=stats.num_tokens)
    _print_summary(args, {**summary, "num_skipped": skipped})
    return 0


@one_line_errors("score-corpus")
def run(args) -> int:
    try:
        return _score_corpus(args)
    except KeyboardInterrupt:
        print("pplfast score-corpus: interrupted; finished rows are saved, rerun with --resume to "
              "continue", file=sys.stderr)
        return 130
