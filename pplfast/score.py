"""``pplfast score``: perplexity of a Hugging Face causal LM on a text file, logits never built.

Input: a ``.txt`` file (one document) or a ``.jsonl`` file (one document per line, text under
``--text-field``). Output: a summary table, or ``--json``; optionally every token's NLL
(``--per-token``) and a plot of NLL against position (``--plot``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

from ._dispatch import BACKENDS, BackendUnavailableError
from ._optional import require
from .windows import MODES

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ScoreError(Exception):
    """A problem to report in one line, without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="local model directory or hub id (a causal LM transformers can load)")
    parser.add_argument("--input", required=True,
                        help=".txt (one document) or .jsonl (one JSON object per line)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl")
    parser.add_argument("--window", type=int, default=None,
                        help="most tokens per forward pass (default: the model's context length)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding mode: tokens between window starts (default window // 2)")
    parser.add_argument("--mode", choices=MODES, default="sliding",
                        help="window schedule for long documents (default sliding)")
    parser.add_argument("--prefix-token-id", type=int, default=None,
                        help="rolling mode: token the first token is predicted from (default BOS, else EOS)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model weights: auto = checkpoint dtype on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--backend", default="auto", help="pplfast backend (default auto)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--per-token", metavar="FILE.jsonl", default=None,
                        help="write document, position, token id, token text and NLL per token")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="plot NLL against position (mean over documents, smoothed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_documents(path: str, text_field: str):
    if not os.path.isfile(path):
        raise ScoreError(f"input {path!r} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"cannot read input {path!r}: {exc}") from None
    if path.endswith(".jsonl"):
        docs = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScoreError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ScoreError(f"{path}:{lineno}: no string field {text_field!r}")
            docs.append(record[text_field])
    else:
        docs = [content]
    if not any(d.strip() for d in docs):
        raise ScoreError(f"input {path!r} has no text to score")
    return docs


def _load(args):
    import torch

    try:
        transformers = require("transformers", extra="hf", feature="pplfast score")
    except ImportError as exc:
        raise ScoreError(str(exc)) from None
    transformers.logging.set_verbosity_error()
    if args.no_progress:
        transformers.logging.disable_progress_bar()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ScoreError(f"bad --device {args.device!r}: {exc}") from None
    if args.dtype == "auto":
        dtype = "auto" if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **{dtype_kw: dtype})
    except Exception as exc:  # OSError, ValueError, ...: all mean "this model cannot be loaded"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScoreError(f"cannot load model {args.model!r}: {first}") from None
    try:
        model = model.to(device).eval()
    except Exception as exc:
        raise ScoreError(f"cannot move the model to {device}: {exc}") from None
    return model, tokenizer, device


def _write_per_token(path, tokenizer, documents):
    with open(path, "w", encoding="utf-8") as f:
        for d, doc in enumerate(documents):
            ids = doc.token_ids.tolist()
            nll = doc.token_nll.tolist()
            scored = doc.scored.tolist()
            for pos, (tid, value, ok) in enumerate(zip(ids, nll, scored)):
                f.write(json.dumps({
                    "document": d, "position": pos, "token_id": tid,
                    "token": tokenizer.decode([tid]), "nll": value if ok else None,
                }, ensure_ascii=False) + "\n")


def _pyplot():
    try:
        require("matplotlib", extra="plot", feature="--plot").use("Agg")
    except ImportError as exc:
        raise ScoreError(str(exc)) from None
    import matplotlib.pyplot as plt

    return plt


def _plot(path, documents, title):
    import torch

    plt = _pyplot()

    length = max(len(doc.token_ids) for doc in documents)
    total = torch.zeros(length, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    for doc in documents:
        n = len(doc.token_ids)
        total[:n] += torch.where(doc.scored, doc.token_nll.double(), torch.zeros(n, dtype=torch.float64))
        count[:n] += doc.scored.double()
    keep = count > 0
    positions = torch.arange(length)[keep]
    mean = (total[keep] / count[keep])
    # moving average over ~1% of the positions: per-token NLL is too noisy to read raw
    width = max(1, len(mean) // 100)
    kernel = torch.ones(width, dtype=torch.float64) / width
    padded = torch.cat([mean[:1].repeat(width // 2), mean, mean[-1:].repeat(width - 1 - width // 2)])
    smooth = torch.nn.functional.conv1d(padded.view(1, 1, -1), kernel.view(1, 1, -1)).flatten()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(positions.numpy(), mean.numpy(), lw=0.5, alpha=0.3, label="mean over documents")
    ax.plot(positions.numpy(), smooth.numpy(), lw=1.5, label=f"moving average ({width} tokens)")
    ax.set_xlabel("token position in document")
    ax.set_ylabel("NLL (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ScoreError(f"cannot write plot {path!r}: {exc}") from None
    finally:
        plt.close(fig)


def _fmt(value, spec=".4f"):
    return "n/a" if value is None else format(value, spec)


def _summary(figures) -> str:
    rows = [
        ("model", figures["model"]),
        ("documents", str(figures["num_documents"])),
        ("tokens scored", str(figures["num_tokens"])),
        ("perplexity", f"{_fmt(figures['perplexity'])} ± {_fmt(figures['perplexity_stderr'])}"),
        ("mean NLL", f"{_fmt(figures['mean_nll'])} nats ({_fmt(figures['bits_per_token'])} bits/token)"),
        ("bits per byte", _fmt(figures["bits_per_byte"])),
        ("word perplexity", _fmt(figures["word_perplexity"])),
        ("tokens/s", _fmt(figures["tokens_per_second"], ".1f")),
        ("windows", f"{figures['mode']}, window {figures['window']}"
                    + (f", stride {figures['stride']}" if figures["mode"] == "sliding" else "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _score(args) -> int:
    if args.window is not None and args.window < 1:
        raise ScoreError(f"--window must be positive, got {args.window}")
    if args.batch_size < 1:
        raise ScoreError(f"--batch-size must be positive, got {args.batch_size}")
    if args.backend not in BACKENDS:
        raise ScoreError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.plot:
        _pyplot()  # a missing extra fails now, not after the scoring
    documents = _read_documents(args.input, args.text_field)
    model, tokenizer, device = _load(args)
    from .hf import _context_length, score_texts

    window = args.window or _context_length(model)
    stride = args.stride
    if args.mode == "sliding" and window is not None and stride is None:
        stride = max(1, window // 2)
    # the bar is a convenience: without the progress extra, score quietly
    progress = not args.no_progress and importlib.util.find_spec("tqdm") is not None
    start = time.perf_counter()
    try:
        scores = score_texts(
            model, tokenizer, documents, window=window, stride=stride, mode=args.mode,
            prefix_token_id=args.prefix_token_id, batch_size=args.batch_size,
            backend=args.backend, progress=progress,
        )
    except (ValueError, BackendUnavailableError) as exc:
        # bad options or an unusable backend: one line, no traceback
        raise ScoreError(str(exc).splitlines()[0]) from None
    seconds = time.perf_counter() - start
    corpus = scores.corpus
    figures = {
        "model": args.model, "num_documents": len(documents),
        **corpus.as_dict(),
        "tokens_per_second": corpus.num_tokens / seconds if seconds > 0 else math.inf,
        "seconds": seconds, "mode": args.mode, "window": window,
        "stride": stride if args.mode == "sliding" else None,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(device), "backend": args.backend,
    }
    if args.per_token:
        try:
            _write_per_token(args.per_token, tokenizer, scores.documents)
        except OSError as exc:
            raise ScoreError(f"cannot write {args.per_token!r}: {exc}") from None
    if args.plot:
        _plot(args.plot, scores.documents, f"{args.model}: per-token NLL")
    if args.json:
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in figures.items()}
        print(json.dumps(finite, indent=2))
    else:
        print(_summary(figures))
    return 0


def run(args) -> int:
    try:
        return _score(args)
    except ScoreError as exc:
        print(f"pplfast score: error: {exc}", file=sys.stderr)
        return 1
