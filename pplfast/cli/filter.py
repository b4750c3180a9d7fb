"""``pplfast filter``: keep the documents of a corpus inside a perplexity band.

The corpus (read by the reader of :mod:`pplfast.corpus.io`, as ``score-corpus`` read it) is
joined with its score rows by id; each record inside the band goes to ``--output`` unchanged plus
a ``pplfast`` object holding its score row, the others to ``--rejected``. The records that
``score-corpus --on-error skip`` skipped are skipped here by the same reader under the same rules.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math

import numpy as np

from ..corpus.io import JSON_SUFFIXES, RecordCheck, expand_inputs, iter_documents, iter_score_rows
from ..corpus.writer import (atomic_output, check_output, check_outputs, dump_row, json_safe,
                             lock_outputs, remove_stale_temporaries)
from ._common import (CliError, add_reading_arguments, check_reading_arguments, errors_output,
                      fixed, one_line_errors)


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_reading_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")




def _band(args):
    if args.percentile_band is not None:
        try:
            lo, hi = (float(x) for x in args.percentile_band.split(":"))
        except ValueError:
            raise CliError(f"--percentile-band must be LO:HI (e.g. 30:60), got {args.percentile_band!r}") from None
        if not (0 <= lo < hi <= 100):
            raise CliError(f"--percentile-band needs 0 <= LO < HI <= 100, got {args.percentile_band!r}")
        return "percentile", lo, hi
    value = args.max_perplexity if args.max_perplexity is not None else args.min_perplexity
    flag = "--max-perplexity" if args.max_perplexity is not None else "--min-perplexity"
    if not math.isfinite(value) or value < 0:
        raise CliError(f"{flag} must be a finite number >= 0, got {value}")
    return ("max", None, value) if args.max_perplexity is not None else ("min", value, None)


def _check_filter_output(flag, path):
    if not check_output(flag, path).regular:
        return  # /dev/stdout, a FIFO: written as they are
    if not path.lower().endswith(JSON_SUFFIXES):
        raise CliError(f"{flag} {path!r}: filter writes JSON lines; name it .jsonl or "
                       ".jsonl.gz (.json and .json.gz are read as JSON lines too)")


@one_line_errors("filter")
def run(args) -> int:
    kind, lo, hi = _band(args)
    check_reading_arguments(args)
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
                raise CliError(f"{path}: score rows have no column {args.by!r}")
            if row["id"] in scores:
                raise CliError(f"{path}: id {row['id']!r} is scored twice")
            scores[row["id"]] = row
    values = np.array([r[args.by] for r in scores.values()], dtype=np.float64)
    values = values[np.isfinite(values)]
    if kind == "percentile":
        if len(values) == 0:
            raise CliError("no scored document: a percentile band is undefined")
        lo_value, hi_value = (float(v) for v in np.percentile(values, [lo, hi]))
        keep = (lambda v: lo_value <= v <= hi_value) if hi == 100 else (lambda v: lo_value <= v < hi_value)
    else:
        lo_value, hi_value = lo, hi
        keep = (lambda v: v <= hi_value) if kind == "max" else (lambda v: v >= lo_value)
    missing, sample = 0, []
    kept = rejected = unscored = 0
    with atomic_output(args.output, label="--output") as out_kept, \
            _maybe_output(args.rejected, "--rejected") as out_rejected, \
            errors_output(args) as errors:
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
            raise CliError(f"{missing} documents of the corpus have no score row (e.g. "
                           f"{', '.join(map(repr, sample))}): the scores are of another corpus "
                           "or an unfinished run (finish it with score-corpus --resume)")
        if scores:
            extra = list(scores)[:3]
            raise CliError(f"{len(scores)} score rows have ids not in the corpus (e.g. "
                           f"{', '.join(map(repr, extra))}): the scores are of another corpus "
                           "or another --id-field")
    figures = {"num_documents": kept + rejected, "num_kept": kept, "num_rejected": rejected,
               "num_unscored": unscored, "num_skipped": check.skipped, "by": args.by,
               "low": lo_value, "high": hi_value}
    if args.json:
        print(json.dumps(json_safe(figures), indent=2))
    else:
        band = (f"{fixed(lo_value)} <= {args.by}" if lo_value is not None else args.by) + (
            f" {'<=' if kind != 'percentile' or hi == 100 else '<'} {fixed(hi_value)}" if hi_value is not None else "")
        print(f"kept {kept} of {kept + rejected} documents ({band}); rejected {rejected}, "
              f"{unscored} of them unscored"
              + (f"; skipped {check.skipped} unreadable records (listed in {args.errors})"
                 if args.on_error == "skip" else ""))
    return 0


def _maybe_output(path, label):
    return atomic_output(path, label=label) if path else contextlib.nullcontext(None)
