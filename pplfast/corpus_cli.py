"""``pplfast score-corpus`` and ``pplfast filter``: score a corpus per document, keep a band.

``score-corpus`` streams documents from ``--input`` (files, directories, globs; see
:mod:`pplfast.corpus_io`), scores them a buffer at a time with :class:`pplfast.CorpusScorer`,
appends one row per document to ``--output`` as it goes, and at the end sets each row's
``outlier`` flag (robust z of its log-perplexity over the run) and prints the summary.
``filter`` joins a corpus with its score rows by id and writes the documents inside a band.
"""
from __future__ import annotations

import argparse
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
from .corpus_io import (
    JSON_SUFFIXES, CorpusIOError, IdIndex, RowAppender, atomic_output, dump_row, expand_inputs,
    iter_documents, iter_score_rows, remove_stale_temporaries, repair_tail, write_parquet,
)
from .windows import MODES

_BUFFER_DOCUMENTS = 1024
# documents are scored a buffer at a time: up to 1024 documents or about eight forward passes of
# text (batch_tokens at ~4 characters a token); larger buffers pack a little tighter
_BUFFER_PASSES = 8


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
                        help=".jsonl, .jsonl.gz, .txt (one document per file), .parquet files, "
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
                        help="continue an interrupted run: skip the ids already in --output")
    parser.add_argument("--outlier-z", type=float, default=3.5,
                        help="flag documents whose log-perplexity is more than this many robust "
                             "standard deviations from the median (default 3.5)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")


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


def _make_scorer(args, model):
    from .corpus import CorpusScorer

    try:
        return CorpusScorer(model, window=args.window, stride=args.stride, mode=args.mode,
                            batch_tokens=args.batch_tokens, text_field=args.text_field,
                            stats=args.stats, device=args.device, dtype=args.dtype,
                            backend=args.backend)
    except (ValueError, TypeError) as exc:
        raise CorpusError(str(exc)) from None


def _score_corpus(args) -> int:
    _check_score_args(args)
    files = expand_inputs(args.input)
    if args.ray:
        return _score_corpus_ray(args, files)
    parquet = args.output.lower().endswith(".parquet")
    rows_path = args.output + ".partial.jsonl" if parquet else args.output
    done, seen = IdIndex(), IdIndex()  # ids in the output before this run; ids read in this run
    if args.resume:
        _prepare_resume(args.output, rows_path, parquet, done)
    elif os.path.exists(args.output) or os.path.exists(rows_path):
        existing = args.output if os.path.exists(args.output) else rows_path
        raise CorpusError(f"{existing!r} exists: pass --resume to continue that run, or remove it")
    check_model_dir(args.model)
    for path in (args.output, rows_path):
        remove_stale_temporaries(path)  # left by a run killed while it renamed its output
    scorer = _make_scorer(args, args.model)
    scorer.model  # load now: a bad model is reported before any document is read
    columns = _score_columns(args.stats)
    writer = RowAppender(rows_path)
    bar = _progress(args)
    documents = tokens = 0
    start = time.perf_counter()
    try:
        buffer, chars = [], 0
        for doc in iter_documents(files, text_field=args.text_field, id_field=args.id_field):
            if not seen.add(doc.id):
                raise CorpusError(f"{doc.where}: duplicate id {doc.id!r}")
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
    _print_summary(args, summary)
    return 0


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
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _score_corpus_ray(args, files):
    """``--ray``: read with Ray Data (Ray's readers with ``--id-field``, else pplfast's reader in
    Ray tasks for the default ids), score on an actor pool, write with Ray's writers."""
    if args.resume:
        raise CorpusError("--resume is not supported with --ray: write to a new --output directory")
    if args.id_field and any(f.lower().endswith(".txt") for f in files):
        raise CorpusError("--ray with --id-field reads .jsonl, .jsonl.gz and .parquet inputs with "
                          "Ray's readers, not .txt files: leave --id-field out to read them")
    if not args.id_field and args.text_field == "id":
        raise CorpusError("--text-field id is the name of the id column: pass --id-field")
    if os.path.exists(args.output):
        raise CorpusError(f"{args.output!r} exists: choose a new --output directory")
    from ._optional import require

    try:
        ray = require("ray", extra="ray", feature="--ray")
    except ImportError as exc:
        raise CorpusError(str(exc)) from None
    _make_scorer(args, args.model)  # bad options fail here, before Ray starts
    check_model_dir(args.model)  # and a missing model directory
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not args.no_progress
    try:
        return _run_ray(args, files, ray)
    except ray.exceptions.RayError as exc:
        # a worker's error (an unreadable file, a model that does not load): its own first line
        cause = getattr(exc, "cause", None) or exc
        raise CorpusError(_first_line(cause)) from None


def _run_ray(args, files, ray):
    from .ray import add_outlier_flags, read_corpus, score_dataset

    start = time.perf_counter()
    id_column = args.id_field or "id"
    ds = read_corpus(files, text_field=args.text_field, id_field=args.id_field)
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
    _print_summary(args, summary)
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
    if not path.lower().endswith(JSON_SUFFIXES):
        raise CorpusError(f"{flag} {path!r}: filter writes JSON lines; name it .jsonl or "
                          ".jsonl.gz (.json and .json.gz are read as JSON lines too)")
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CorpusError(f"{flag} {path!r} is a directory")
    if not os.path.isdir(directory):
        raise CorpusError(f"{flag} {path!r}: directory {directory!r} does not exist")


def _filter(args) -> int:
    kind, lo, hi = _band(args)
    for flag, path in (("--output", args.output), ("--rejected", args.rejected)):
        if path is not None:
            _check_filter_output(flag, path)
    files = expand_inputs(args.input)
    for path in (args.output, args.rejected):
        if path is not None:
            remove_stale_temporaries(path)  # left by a run killed while it renamed its output
    scores = {}
    for path in expand_inputs(args.scores):
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
    seen = IdIndex()
    missing, sample = 0, []
    kept = rejected = unscored = 0
    with atomic_output(args.output) as out_kept, _maybe_output(args.rejected) as out_rejected:
        for doc in iter_documents(files, text_field=args.text_field, id_field=args.id_field,
                                  keep_record=True):
            if not seen.add(doc.id):
                raise CorpusError(f"{doc.where}: duplicate id {doc.id!r}")
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
               "num_unscored": unscored, "by": args.by, "low": lo_value, "high": hi_value}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        band = (f"{_fmt(lo_value)} <= {args.by}" if lo_value is not None else args.by) + (
            f" {'<=' if kind != 'percentile' or hi == 100 else '<'} {_fmt(hi_value)}" if hi_value is not None else "")
        print(f"kept {kept} of {kept + rejected} documents ({band}); rejected {rejected}, "
              f"{unscored} of them unscored")
    return 0


class _NoOutput:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _maybe_output(path):
    return atomic_output(path) if path else _NoOutput()
