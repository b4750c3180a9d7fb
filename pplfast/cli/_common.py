"""The shared CLI toolkit: what several commands need, written once.

- errors: :class:`CliError` and :func:`report`, the one-line ``pplfast COMMAND: error: ...``;
- inputs: the arguments and the document reader of ``score`` and ``compare``
  (:func:`read_documents`, the corpus reader :mod:`pplfast.corpus.io`), the reading options of
  ``score-corpus`` and ``filter``;
- the model: device and dtype parsing and loading (:mod:`pplfast.models.loading`), the backend
  that runs;
- output: numbers for people (:func:`human`, :func:`fixed`), JSON with NaN as null
  (:func:`json_safe`), a token's text (:func:`token_text`), the summary / ``--json`` /
  ``--per-token`` / ``--plot`` block of ``score`` and ``compare``, plain-text tables;
- the machine (CPU model, driver, package versions) for ``doctor`` and ``bench``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from typing import Optional, Sequence

from .._optional import require
from ..api import BackendUnavailableError, resolve_backend
from ..corpus.io import FORMATS, ON_ERROR, CorpusIOError, expand_inputs, iter_documents
from ..corpus.writer import atomic_output, check_outputs, dump_row, json_safe
from ..models.head import model_device
from ..models.loading import ModelLoadError, first_line, parse_device
from ..models.loading import load_model as _load_model
from ..models.windows import MODES


class CliError(Exception):
    """A user mistake found while running, reported in one line without a traceback."""


# what a command reports in one line (exit code 1) rather than with a traceback
USER_ERRORS = (CliError, CorpusIOError, ModelLoadError)


def report(command: str, exc: BaseException) -> int:
    """Print ``pplfast COMMAND: error: <first line>`` on stderr; returns the exit code, 1."""
    print(f"pplfast {command}: error: {first_line(exc)}", file=sys.stderr)
    return 1


def one_line_errors(command: str):
    """Decorate a command's ``run(args) -> int``: a user mistake it raises (:data:`USER_ERRORS`)
    is reported by :func:`report` (exit code 1), never as a traceback."""
    def decorate(run):
        @functools.wraps(run)
        def guarded(args) -> int:
            try:
                return run(args)
            except USER_ERRORS as exc:
                return report(command, exc)
        return guarded
    return decorate


# ---- inputs ------------------------------------------------------------------------------------

INPUT_HELP = ("files (.txt: one document; .jsonl, .json, .ndjson: JSON lines or one JSON array; "
              "each optionally .gz; .parquet), directories or globs")
FORMAT_HELP = "kind of every input file: auto = from its name (jsonl: JSON lines or a JSON array)"


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """``--input``, ``--format`` and ``--text-field`` of ``score`` and ``compare``."""
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH", help=INPUT_HELP)
    parser.add_argument("--format", choices=FORMATS, default="auto", help=FORMAT_HELP)
    parser.add_argument("--text-field", default="text", help="field holding the text in JSON records")


def add_window_arguments(parser: argparse.ArgumentParser, *, window_help: str,
                         prefix_help: str) -> None:
    """``--window``, ``--stride``, ``--mode``, ``--prefix-token-id`` and ``--batch-size`` of
    ``score`` and ``compare``."""
    parser.add_argument("--window", type=int, default=None, help=window_help)
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding mode: tokens between window starts (default: window // 2)")
    parser.add_argument("--mode", choices=MODES, default="sliding",
                        help="window schedule for long documents")
    parser.add_argument("--prefix-token-id", type=int, default=None, help=prefix_help)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")


def add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--on-error`` and ``--errors`` of ``score-corpus`` and ``filter``."""
    parser.add_argument("--format", choices=FORMATS, default="auto", help=FORMAT_HELP)
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="a record that cannot be read (malformed JSON, undecodable bytes, "
                             "no text, a bad or repeated id): stop (fail, the default), or skip "
                             "it and list it in --errors")
    parser.add_argument("--errors", default=None, metavar="ERRORS.jsonl",
                        help="with --on-error skip: where the skipped records go, one JSON line "
                             "each (file, line, reason)")


def check_reading_arguments(args) -> None:
    if args.on_error == "skip" and not args.errors:
        raise CliError("--on-error skip needs --errors FILE: the skipped records are listed there")
    if args.errors and args.on_error != "skip":
        raise CliError("--errors lists the records that --on-error skip skips: pass "
                       "--on-error skip too")


def errors_output(args):
    """The ``--errors`` file, written whole at the end of the run (None without it)."""
    if not args.errors:
        return contextlib.nullcontext(None)
    return atomic_output(args.errors, label="--errors")


def check_window_options(args) -> None:
    """``--window``, ``--stride`` and ``--batch-size`` of ``score`` and ``compare``."""
    if args.window is not None and args.window < 2:
        raise CliError(f"--window must be at least 2 tokens, got {args.window}")
    if args.stride is not None and args.stride < 1:
        raise CliError(f"--stride must be positive, got {args.stride}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be positive, got {args.batch_size}")


def output_paths(args):
    """``(option, path)`` of the files ``score`` and ``compare`` write (None where not asked)."""
    return [("--json", None if args.json in (None, "-") else args.json),
            ("--per-token", args.per_token), ("--plot", args.plot)]


def read_documents(args):
    """The documents of ``--input`` (the corpus reader, one document per text file), once the
    outputs are known to be writable and none of them an input or another output."""
    files = expand_inputs(args.input, args.format)
    check_outputs(output_paths(args), [("--input", f) for f in files])
    documents = list(iter_documents(files, text_field=args.text_field, fmt=args.format))
    if not any(doc.text.strip() for doc in documents):
        raise CliError(f"input {' '.join(args.input)!r} has no text to score")
    return documents


# ---- the model ---------------------------------------------------------------------------------

def device(name, option: str = "--device"):
    """The ``torch.device`` named on the command line (None: cuda if available, else cpu)."""
    try:
        return parse_device(name, option=option)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def load_model(name: str, dtype: str, on):
    """``(model, tokenizer)`` on device ``on``, or :class:`CliError` saying what is wrong."""
    try:
        return _load_model(name, device=on, dtype=dtype)
    except (ModelLoadError, ImportError) as exc:
        raise CliError(str(exc)) from None


def resolved_backend(backend: str, model) -> str:
    """The backend that runs for ``model``'s tensors (``auto`` resolved), or :class:`CliError`."""
    try:
        return resolve_backend(backend, model_device(model))
    except (ValueError, BackendUnavailableError) as exc:
        raise CliError(first_line(exc)) from None


def progress_wanted(args) -> bool:
    """A progress bar unless ``--no-progress``; it is a convenience: without the progress
    extra, commands run quietly."""
    return not args.no_progress and importlib.util.find_spec("tqdm") is not None


# ---- output ------------------------------------------------------------------------------------

def human(value, decimals: int = 4) -> str:
    """A figure for people: fixed decimals in the usual range, ``1.22e9`` outside it."""
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e6:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{decimals}f}"


def fixed(value, spec: str = ".4f") -> str:
    """``format(value, spec)``, ``n/a`` for None."""
    return "n/a" if value is None else format(value, spec)


def token_text(tokenizer, token_id: int) -> str:
    """A token's text, readable also when it is part of a multi-byte character: the valid UTF-8
    is kept and the partial bytes are written as ``\\xNN`` escapes (byte-level BPE), else the
    tokenizer's own token string (e.g. ``<0xE6>``)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    raw = _byte_level_bytes(piece) if isinstance(piece, str) else None
    if raw is not None:
        return raw.decode("utf-8", errors="backslashreplace")
    return piece if isinstance(piece, str) else text


def _byte_level_table():
    # the reversible byte <-> printable character map of byte-level BPE (GPT-2 and successors)
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_table()


def _byte_level_bytes(piece: str):
    if not piece or any(c not in _BYTE_LEVEL for c in piece):
        return None
    return bytes(_BYTE_LEVEL[c] for c in piece)


def add_output_arguments(parser: argparse.ArgumentParser, *, per_token_help: str,
                         plot_help: str, between=()) -> None:
    """``--json [FILE]``, then the options ``between`` (``(flags, kwargs)``), ``--per-token``,
    ``--plot`` and ``--no-progress`` of ``score`` and ``compare``."""
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="print the figures as one JSON object (to FILE if given)")
    for flags, kwargs in between:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--per-token", metavar="FILE.jsonl", default=None, help=per_token_help)
    parser.add_argument("--plot", metavar="FILE.png", default=None, help=plot_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def emit_figures(json_option: Optional[str], figures: dict, summary: str) -> None:
    """The summary for people, or with ``--json`` the figures as one JSON object (NaN and
    infinities as null), printed or written to the file named."""
    if json_option is None:
        print(summary, flush=True)
        return
    text = json.dumps(json_safe(figures), indent=2)
    if json_option == "-":
        print(text, flush=True)
    else:
        with atomic_output(json_option, label="--json") as f:
            f.write(text + "\n")


def write_rows(path: str, rows, *, label: str = "--per-token") -> None:
    """One JSON line per row (NaN and infinities as null), the file written whole."""
    with atomic_output(path, label=label) as f:
        for row in rows:
            f.write(dump_row(row))


def pyplot():
    """matplotlib's pyplot on the Agg backend, or :class:`CliError` naming the extra."""
    try:
        require("matplotlib", extra="plot", feature="--plot").use("Agg")
    except ImportError as exc:
        raise CliError(str(exc)) from None
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str) -> None:
    """A ``--plot`` file matplotlib can write (checked before any work)."""
    plt = pyplot()
    fig = plt.figure()
    try:
        supported = fig.canvas.get_supported_filetypes()
    finally:
        plt.close(fig)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in supported:
        raise CliError(f"--plot {path!r}: matplotlib cannot write .{ext or '(no extension)'} "
                       f"files; use one of .{', .'.join(sorted(supported))}")


def save_figure(fig, path: str) -> None:
    """Write ``fig`` to the ``--plot`` file (whole, in the format its name says) and close it."""
    plt = pyplot()
    try:
        with atomic_output(path, "path", label="--plot") as tmp:
            fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1].lstrip(".").lower())
    finally:
        plt.close(fig)


def table(head: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> list:
    """Lines of a table: ``head``, a rule, then ``rows``; the first ``left`` columns are
    left-aligned, the others right-aligned. A row shorter than ``head`` spills its last cell
    past the column widths (for error messages) instead of widening them."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in head]
    for row in cells:
        if len(row) == len(head):
            widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(row):
        parts = [c.ljust(widths[j]) if j < left else c.rjust(widths[j])
                 for j, c in enumerate(row[: len(head)])]
        if len(row) < len(head):
            parts[-1] = row[-1]
        return "  ".join(parts).rstrip()

    return [line(list(head)), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]


def key_values(rows: Sequence[Sequence[object]]) -> str:
    """``key  value`` lines with the keys padded to one width."""
    width = max((len(str(k)) for k, _ in rows), default=0)
    return "\n".join(f"{str(k):<{width}}  {v}" for k, v in rows)


# ---- the machine -------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def driver_version() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(module: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:
        return None
