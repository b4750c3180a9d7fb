"""``pplfast score``: perplexity of a Hugging Face causal LM on text files, logits never built.

Input: files, directories or globs read by the corpus reader (:mod:`pplfast.corpus.io`, the one
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
import math
import os
import time
from typing import NamedTuple, Optional

import numpy as np

from .._version import __version__
from ..api import BACKENDS, BackendUnavailableError
from ..corpus.writer import lock_outputs
from ..models.head import context_length, vocab_size
from ..models.loading import DTYPES, ModelLoadError
from ..models.parallel import load_model_tp, tensor_parallel_mesh
from ..models.score import score_texts
from ._common import (CliError, add_input_arguments, add_output_arguments, add_window_arguments,
                      check_plot_path, check_window_options, device, emit_figures, first_line,
                      human, key_values, load_model, one_line_errors, output_paths,
                      progress_wanted, pyplot, read_documents, resolved_backend, save_figure,
                      token_text, write_rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="local model directory or hub id (a causal LM transformers can load)")
    add_input_arguments(parser)
    add_window_arguments(
        parser, window_help="most tokens per forward pass (default: the model's context length)",
        prefix_help="rolling mode: token the first token is predicted from (default: BOS, else "
                    "EOS)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model weights: auto = checkpoint dtype on GPU, float32 on CPU")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="pplfast backend")
    add_output_arguments(
        parser, between=[(("--per-document",), dict(
            action="store_true", help="with --json: add every document's figures"))],
        per_token_help="write document, position, token id, token text and NLL per token",
        plot_help="plot NLL against position (mean over documents, smoothed); any format "
                  "matplotlib writes (.png, .pdf, .svg, ...)")
    parser.add_argument("--stats", action="store_true",
                        help="also per-token entropy, max log-probability, argmax and target "
                             "rank (in --per-token rows); mean entropy and top-1 accuracy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="with --stats (implied): the K most probable tokens per position "
                             "in --per-token rows, K in [0, 64]")
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help="split the model over the N processes of `torchrun "
                             "--nproc-per-node N`, its output layer by vocabulary (no rank "
                             "holds the logits of the whole vocabulary); rank 0 prints and "
                             "writes")


def _check_model_options(args, model) -> int:
    """Options that need the model; returns the window."""
    context = context_length(model)
    window = args.window or context
    if window is None:
        raise CliError("the model config states no context length: pass --window")
    if context is not None and window > context:
        raise CliError(f"--window {window} is longer than the model's context length "
                       f"{context}: pass --window {context} or less")
    if args.prefix_token_id is not None:
        V = vocab_size(model)
        if V is not None and not 0 <= args.prefix_token_id < V:
            raise CliError(f"--prefix-token-id {args.prefix_token_id} is outside the model's "
                           f"vocabulary [0, {V})")
    return window


# ---- output ------------------------------------------------------------------------------------

def _per_token_rows(tokenizer, documents):
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
            yield row


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
    plt = pyplot()
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


# ---- the command -------------------------------------------------------------------------------

def _check_options(args) -> None:
    check_window_options(args)
    if not 0 <= args.top_k <= 64:
        raise CliError(f"--top-k must lie in [0, 64], got {args.top_k}")
    if args.tp is not None and args.tp < 1:
        raise CliError(f"--tp must be a positive number of processes, got {args.tp}")
    if args.per_document and args.json is None:
        raise CliError("--per-document adds to the JSON output: pass --json too")
    if args.plot:
        check_plot_path(args.plot)  # a missing extra fails now, not after scoring


def _writes(args) -> bool:
    """Whether this process prints and writes: always, but for ranks other than 0 of --tp."""
    return not args.tp or int(os.environ.get("RANK", "0")) == 0


@one_line_errors("score")
def run(args) -> int:
    _check_options(args)
    docs = read_documents(args)  # output paths are checked there, before the model loads
    with lock_outputs(output_paths(args) if _writes(args) else []):
        return _score_documents(args, docs)


def _load(args, on):
    """``(model, tokenizer, device)``: with --tp, split over this torchrun job's processes."""
    if not args.tp:
        return (*load_model(args.model, args.dtype, on), on)
    try:
        mesh, on = tensor_parallel_mesh(args.tp, args.device)
        return (*load_model_tp(args.model, mesh=mesh, device=on, dtype=args.dtype), on)
    except (ValueError, ModelLoadError, ImportError) as exc:
        raise CliError(first_line(exc)) from None


def _score_documents(args, docs) -> int:
    documents = [doc.text for doc in docs]
    model, tokenizer, on = _load(args, device(args.device))
    window = _check_model_options(args, model)
    backend = resolved_backend(args.backend, model)
    stride = args.stride
    if args.mode == "sliding" and stride is None:
        stride = max(1, window // 2)
    start = time.perf_counter()
    try:
        scores = score_texts(
            model, tokenizer, documents, window=window, stride=stride, mode=args.mode,
            prefix_token_id=args.prefix_token_id, batch_size=args.batch_size,
            backend=args.backend, progress=progress_wanted(args) and _writes(args),
            stats=args.stats or args.top_k > 0, top_k=args.top_k,
        )
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        # bad options, nothing to score or an unusable backend: one line, no traceback
        raise CliError(first_line(exc)) from None
    seconds = time.perf_counter() - start
    corpus = scores.corpus
    figures = {
        "pplfast_version": __version__, "model": args.model, "num_documents": len(documents),
        **corpus.as_dict(),
        "tokens_per_second": corpus.num_tokens / seconds if seconds > 0 else math.inf,
        "seconds": seconds, "mode": args.mode, "window": window,
        "stride": stride if args.mode == "sliding" else None, "num_windows": scores.num_windows,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(on), "backend": backend,
    }
    if args.per_document:
        figures["documents"] = [
            {"document": i, "id": docs[i].id, "num_tokens": d.num_tokens, "num_bytes": d.num_bytes,
             "num_words": d.num_words, "sum_nll": d.sum_nll, "mean_nll": d.mean_nll,
             "perplexity": d.perplexity}
            for i, d in enumerate(scores.documents)
        ]
    if not _writes(args):
        return 0
    # the summary first: a failed write of the large files below loses nothing else
    emit_figures(args.json, figures, _summary(figures))
    if args.per_token:
        write_rows(args.per_token, _per_token_rows(tokenizer, scores.documents))
    if args.plot:
        fig = plot_figure(plot_data(scores.documents, window), f"{args.model}: per-token NLL")
        save_figure(fig, args.plot)
    return 0
