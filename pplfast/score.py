"""``pplfast score``: perplexity of a Hugging Face causal LM on text files, logits never built.

Input: files, directories or globs read by the corpus reader (:mod:`pplfast.corpus_io`, the one
every command uses): a text file is one document, a JSON file holds one object per line or one
array of objects (text under ``--text-field``), each optionally gzip-compressed, and parquet;
the kind follows the name or ``--format``. Output: a summary table, or ``--json``; optionally
every token's NLL (``--per-token``), every document's figures (``--per-document``) and a plot of
NLL against position (``--plot``).

Every user mistake is found before the model runs where it can be (inputs, options, output
paths: none may be an input or another output), and reported as one line; output files are
written by the corpus writer (atomically, umask's mode, symlinks followed, devices written
directly), after the summary, and locked against a second run meanwhile.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import NamedTuple, Optional

import numpy as np

from . import _models
from ._dispatch import BACKENDS, BackendUnavailableError
from ._models import first_line as _first_line
from ._optional import require
from ._table import key_values
from ._version import __version__
from .corpus_io import (FORMATS, CorpusIOError, atomic_output, check_outputs, expand_inputs,
                        iter_documents, lock_outputs)
from .windows import MODES

DTYPES = ("auto", "float32", "bfloat16", "float16")
INPUT_HELP = ("files (.txt: one document; .jsonl, .json, .ndjson: JSON lines or one JSON array; "
              "each optionally .gz; .parquet), directories or globs")
FORMAT_HELP = "kind of every input file: auto = from its name (jsonl: JSON lines or a JSON array)"


class ScoreError(Exception):
    """A problem to report in one line, without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="local model directory or hub id (a causal LM transformers can load)")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH", help=INPUT_HELP)
    parser.add_argument("--format", choices=FORMATS, default="auto", help=FORMAT_HELP)
    parser.add_argument("--text-field", default="text", help="field holding the text in JSON records")
    parser.add_argument("--window", type=int, default=None,
                        help="most tokens per forward pass (default: the model's context length)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding mode: tokens between window starts (default: window // 2)")
    parser.add_argument("--mode", choices=MODES, default="sliding",
                        help="window schedule for long documents")
    parser.add_argument("--prefix-token-id", type=int, default=None,
                        help="rolling mode: token the first token is predicted from "
                             "(default: BOS, else EOS)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model weights: auto = checkpoint dtype on GPU, float32 on CPU")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="pplfast backend")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="print the figures as one JSON object (to FILE if given)")
    parser.add_argument("--per-document", action="store_true",
                        help="with --json: add every document's figures")
    parser.add_argument("--per-token", metavar="FILE.jsonl", default=None,
                        help="write document, position, token id, token text and NLL per token")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="plot NLL against position (mean over documents, smoothed); "
                             "any format matplotlib writes (.png, .pdf, .svg, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--stats", action="store_true",
                        help="also per-token entropy, max log-probability, argmax and target "
                             "rank (in --per-token rows); mean entropy and top-1 accuracy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="with --stats (implied): the K most probable tokens per position "
                             "in --per-token rows, K in [0, 64]")


# ---- inputs and outputs ------------------------------------------------------------------------

def output_paths(args):
    """``(option, path)`` of the files the command writes (None where not asked for)."""
    return [("--json", None if args.json in (None, "-") else args.json),
            ("--per-token", args.per_token), ("--plot", args.plot)]


def read_inputs(args):
    """The documents of ``--input`` (the corpus reader, one document per text file), once the
    outputs are known to be writable and none of them an input or another output."""
    files = expand_inputs(args.input, args.format)
    check_outputs(output_paths(args), [("--input", f) for f in files])
    documents = list(iter_documents(files, text_field=args.text_field, fmt=args.format))
    if not any(doc.text.strip() for doc in documents):
        raise ScoreError(f"input {' '.join(args.input)!r} has no text to score")
    return documents


def _pyplot():
    try:
        require("matplotlib", extra="plot", feature="--plot").use("Agg")
    except ImportError as exc:
        raise ScoreError(str(exc)) from None
    import matplotlib.pyplot as plt

    return plt


def _check_plot_path(path: str) -> None:
    plt = _pyplot()
    fig = plt.figure()
    try:
        supported = fig.canvas.get_supported_filetypes()
    finally:
        plt.close(fig)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in supported:
        raise ScoreError(f"--plot {path!r}: matplotlib cannot write .{ext or '(no extension)'} "
                         f"files; use one of .{', .'.join(sorted(supported))}")


# ---- model -------------------------------------------------------------------------------------

def _device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ScoreError(f"bad --device {name!r}: {str(exc).splitlines()[0]}") from None
    if device.type == "meta":
        raise ScoreError("--device meta holds no data and cannot run a model: use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ScoreError(f"--device {name!r}: this machine has no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ScoreError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if not (callable(available) and available()):
            raise ScoreError(f"--device {name!r} is not available on this machine "
                             "(use cpu or cuda)")
    return device


def load_model(name: str, dtype_name: str, device):
    """``(model, tokenizer)`` on ``device``, or :class:`ScoreError` saying what is wrong."""
    try:
        return _models.load_model(name, device=device, dtype=dtype_name)
    except (_models.ModelLoadError, ImportError) as exc:
        raise ScoreError(str(exc)) from None


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def _check_model_options(args, model) -> int:
    """Options that need the model; returns the window."""
    from .hf import _context_length

    context = _context_length(model)
    window = args.window or context
    if window is None:
        raise ScoreError("the model config states no context length: pass --window")
    if context is not None and window > context:
        raise ScoreError(f"--window {window} is longer than the model's context length "
                         f"{context}: pass --window {context} or less")
    if args.prefix_token_id is not None:
        V = _vocab_size(model)
        if not 0 <= args.prefix_token_id < V:
            raise ScoreError(f"--prefix-token-id {args.prefix_token_id} is outside the model's "
                             f"vocabulary [0, {V})")
    return window


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


def _write_per_token(path, tokenizer, documents):
    with atomic_output(path, label="--per-token") as f:
        for d, doc in enumerate(documents):
            ids = doc.token_ids.tolist()
            nll = doc.token_nll.tolist()
            scored = doc.scored.tolist()
            extra = _token_stats_rows(tokenizer, doc.stats) if doc.stats is not None else None
            for pos, (tid, value, ok) in enumerate(zip(ids, nll, scored)):
                row = {"document": d, "position": pos, "token_id": tid,
                       "token": token_text(tokenizer, tid), "nll": value if ok else None}
                if extra is not None:
                    row.update(extra(pos) if ok else dict.fromkeys(extra.keys))
                f.write(json.dumps(_finite(row), ensure_ascii=False) + "\n")


def _token_stats_rows(tokenizer, stats):
    """Per position: entropy, max_logprob, argmax, rank and, with top-k, the top_k list."""
    columns = {name: getattr(stats, name).tolist()
               for name in ("entropy", "max_logprob", "argmax", "rank")}
    top = None
    if stats.top_k_ids is not None:
        top = (stats.top_k_ids.tolist(), stats.top_k_logprobs.tolist())

    def row(pos):
        out = {name: values[pos] for name, values in columns.items()}
        if top is not None:
            out["top_k"] = [{"id": i, "token": token_text(tokenizer, i), "logprob": lp}
                            for i, lp in zip(top[0][pos], top[1][pos])]
        return out

    row.keys = list(columns) + (["top_k"] if top is not None else [])
    return row


class PlotData(NamedTuple):
    """What ``--plot`` draws, position by position (positions no document scores are left out)."""

    positions: np.ndarray  # token positions in the document, int64
    mean: np.ndarray  # mean NLL over the documents scored at each position, float64
    documents: np.ndarray  # how many documents are scored at each position, int64
    smooth: np.ndarray  # moving average of ``mean`` over ``width`` positions, float64
    width: int  # ~2% of the scored positions, at least 1, at most 512
    window: Optional[int]  # where the first window ends, when a document runs past it


def plot_data(documents, window: Optional[int]) -> PlotData:
    """The curves of ``--plot`` from the scored documents (``token_ids``, ``token_nll``,
    ``scored`` each): the mean NLL at each position over the documents scored there, how many
    those are (the tail averages few documents and is noisy, not rising), and a moving average
    whose width follows the length (per-token NLL is too noisy to read raw)."""
    length = max(len(doc.token_ids) for doc in documents)
    total = np.zeros(length, dtype=np.float64)
    count = np.zeros(length, dtype=np.int64)
    for doc in documents:
        scored = doc.scored.cpu().numpy().astype(bool)
        nll = doc.token_nll.cpu().double().numpy()
        n = len(scored)
        total[:n] += np.where(scored, nll, 0.0)
        count[:n] += scored
    keep = count > 0
    mean = total[keep] / count[keep]
    width = int(min(512, max(1, len(mean) // 50)))
    # edges padded with the first and last values, so the average keeps its length
    padded = np.concatenate([np.repeat(mean[:1], width // 2), mean,
                             np.repeat(mean[-1:], width - 1 - width // 2)])
    smooth = np.convolve(padded, np.full(width, 1.0 / width), mode="valid")
    return PlotData(positions=np.flatnonzero(keep), mean=mean, documents=count[keep],
                    smooth=smooth, width=width,
                    window=window if window is not None and window < length else None)


def plot_figure(data: PlotData, title: str):
    """The matplotlib figure of ``--plot`` (the caller closes it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.plot(data.positions, data.mean, lw=0.5, alpha=0.3, label="mean over documents")
    ax.plot(data.positions, data.smooth, lw=1.5,
            label=f"moving average ({data.width} token{'s' if data.width > 1 else ''})")
    if data.window is not None:
        ax.axvline(data.window, color="grey", ls="--", lw=1, label=f"window ({data.window} tokens)")
    ax.set_xlabel("token position in document")
    ax.set_ylabel("NLL (nats)")
    ax.grid(alpha=0.3)
    # how many documents reach each position: the tail averages few documents and is noisy
    docs_ax = ax.twinx()
    docs_ax.fill_between(data.positions, data.documents, step="mid", color="tab:green",
                         alpha=0.12, label="documents at this position")
    docs_ax.set_ylabel("documents at this position")
    docs_ax.set_ylim(0, float(data.documents.max()) * 1.05)
    ax.set_zorder(docs_ax.get_zorder() + 1)
    ax.patch.set_visible(False)
    handles = ax.get_legend_handles_labels()
    extra = docs_ax.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot(path, documents, title, window):
    plt = _pyplot()
    fig = plot_figure(plot_data(documents, window), title)
    try:
        with atomic_output(path, "path", label="--plot") as tmp:
            fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1].lstrip(".").lower())
    finally:
        plt.close(fig)


def _summary(figures) -> str:
    rows = [
        ("model", figures["model"]),
        ("documents", human(figures["num_documents"])),
        ("tokens scored", human(figures["num_tokens"])),
        ("perplexity", f"{human(figures['perplexity'])} ± {human(figures['perplexity_stderr'])}"),
        ("mean NLL", f"{human(figures['mean_nll'])} nats "
                     f"({human(figures['bits_per_token'])} bits/token)"),
        ("bits per byte", human(figures["bits_per_byte"])),
        ("word perplexity", human(figures["word_perplexity"])),
        *([("mean entropy", f"{human(figures['mean_entropy'])} nats"),
           ("top-1 accuracy", human(figures["top1_accuracy"]))]
          if figures.get("mean_entropy") is not None else []),
        ("tokens/s", human(figures["tokens_per_second"], 1)),
        ("windows", f"{figures['mode']}, window {figures['window']}"
                    + (f", stride {figures['stride']}" if figures["mode"] == "sliding" else "")
                    + f" ({human(figures['num_windows'])} windows)"),
        ("ran on", f"backend {figures['backend']}, {figures['dtype']} on {figures['device']}"),
    ]
    return key_values(rows)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _resolved_backend(backend: str, model) -> str:
    from . import _dispatch
    from .hf import _model_device

    try:
        return _dispatch.resolve(backend, _model_device(model))
    except (ValueError, BackendUnavailableError) as exc:
        raise ScoreError(_first_line(exc)) from None


# ---- the command -------------------------------------------------------------------------------

def _check_options(args) -> None:
    if args.window is not None and args.window < 2:
        raise ScoreError(f"--window must be at least 2 tokens, got {args.window}")
    if args.stride is not None and args.stride < 1:
        raise ScoreError(f"--stride must be positive, got {args.stride}")
    if args.batch_size < 1:
        raise ScoreError(f"--batch-size must be positive, got {args.batch_size}")
    if not 0 <= args.top_k <= 64:
        raise ScoreError(f"--top-k must lie in [0, 64], got {args.top_k}")
    if args.per_document and args.json is None:
        raise ScoreError("--per-document adds to the JSON output: pass --json too")
    if args.plot:
        _check_plot_path(args.plot)  # a missing extra fails now, not after scoring


def _score(args) -> int:
    _check_options(args)
    docs = read_inputs(args)  # output paths are checked there, before the model loads
    with lock_outputs(output_paths(args)):
        return _score_documents(args, docs)


def _score_documents(args, docs) -> int:
    documents = [doc.text for doc in docs]
    device = _device(args.device)
    model, tokenizer = load_model(args.model, args.dtype, device)
    window = _check_model_options(args, model)
    backend = _resolved_backend(args.backend, model)
    from .hf import score_texts

    stride = args.stride
    if args.mode == "sliding" and stride is None:
        stride = max(1, window // 2)
    # the bar is a convenience: without the progress extra, score quietly
    progress = not args.no_progress and importlib.util.find_spec("tqdm") is not None
    start = time.perf_counter()
    try:
        scores = score_texts(
            model, tokenizer, documents, window=window, stride=stride, mode=args.mode,
            prefix_token_id=args.prefix_token_id, batch_size=args.batch_size,
            backend=args.backend, progress=progress, stats=args.stats or args.top_k > 0,
            top_k=args.top_k,
        )
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        # bad options, nothing to score or an unusable backend: one line, no traceback
        raise ScoreError(_first_line(exc)) from None
    seconds = time.perf_counter() - start
    corpus = scores.corpus
    figures = {
        "pplfast_version": __version__, "model": args.model, "num_documents": len(documents),
        **corpus.as_dict(),
        "tokens_per_second": corpus.num_tokens / seconds if seconds > 0 else math.inf,
        "seconds": seconds, "mode": args.mode, "window": window,
        "stride": stride if args.mode == "sliding" else None, "num_windows": scores.num_windows,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(device), "backend": backend,
    }
    if args.per_document:
        figures["documents"] = [
            {"document": i, "id": docs[i].id, "num_tokens": d.num_tokens, "num_bytes": d.num_bytes,
             "num_words": d.num_words, "sum_nll": d.sum_nll, "mean_nll": d.mean_nll,
             "perplexity": d.perplexity}
            for i, d in enumerate(scores.documents)
        ]
    # the summary first: a failed write of the large files below loses nothing else
    if args.json is None:
        print(_summary(figures), flush=True)
    else:
        text = json.dumps(_finite(figures), indent=2)
        if args.json == "-":
            print(text, flush=True)
        else:
            with atomic_output(args.json, label="--json") as f:
                f.write(text + "\n")
    if args.per_token:
        _write_per_token(args.per_token, tokenizer, scores.documents)
    if args.plot:
        _plot(args.plot, scores.documents, f"{args.model}: per-token NLL", window)
    return 0


def run(args) -> int:
    try:
        return _score(args)
    except (ScoreError, CorpusIOError) as exc:
        print(f"pplfast score: error: {exc}", file=sys.stderr)
        return 1
