"""``pplfast compare``: how far a test model moved from a base model, token by token.

Both models score the same text on the same windows; their logits are never built (the
hidden-states path of each, see :func:`pplfast.compare_models`). Output: llama.cpp-style blocks
(perplexity, KL divergence, token probability statistics) or ``--json``; optionally every token's
KL, NLLs and argmaxes (``--per-token``) and a plot of the KL along the position (``--plot``).
The two models must share a tokenizer; base and test may sit on different devices.
"""
from __future__ import annotations

import argparse
import math
import time

from .._version import __version__
from ..api import BACKENDS, BackendUnavailableError
from ..corpus.writer import lock_outputs
from ..models.compare import compare_models
from ..models.head import context_length, llamacpp_bos
from ..models.loading import DTYPES
from ._common import (CliError, add_input_arguments, add_output_arguments, add_window_arguments,
                      check_plot_path, check_window_options, device, emit_figures, first_line,
                      human, load_model, one_line_errors, output_paths, progress_wanted, pyplot,
                      read_documents, resolved_backend, save_figure, token_text, write_rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True,
                        help="the reference model: local directory or hub id")
    parser.add_argument("--model", required=True,
                        help="the model compared with it (quantized, pruned, fine-tuned, ...)")
    add_input_arguments(parser)
    add_window_arguments(
        parser, window_help="most tokens per forward pass (default: the shorter context length of "
                            "the two models)",
        prefix_help="rolling mode: token the first token is predicted from (default: BOS, else "
                    "EOS); llamacpp mode: token put first in every chunk (default: BOS when the "
                    "tokenizer adds one, else none)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights of both models: auto = checkpoint dtype on GPU, float32 on "
                             "CPU")
    parser.add_argument("--device", default=None,
                        help="torch device of --model, e.g. cpu, cuda, cuda:1 (default: cuda if "
                             "available)")
    parser.add_argument("--device-base", default=None,
                        help="torch device of --base (default: the one of --model)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="pplfast backend")
    add_output_arguments(
        parser, per_token_help="write document, position, token, KL both ways, both NLLs and "
                               "both argmaxes (id and text) per token",
        plot_help="plot the KL along the position and its distribution")


def _check_options(args) -> None:
    check_window_options(args)
    if args.plot:
        check_plot_path(args.plot)


def check_same_tokenizer(base_tok, test_tok, base_name: str, test_name: str) -> None:
    """Refuse two tokenizers that map text to different ids (a comparison of their tokens would
    compare different things)."""
    vb, vt = base_tok.get_vocab(), test_tok.get_vocab()
    if vb != vt:
        diff = len(set(vb.items()) ^ set(vt.items()))
        raise CliError(
            f"the tokenizers of --base {base_name!r} ({len(vb)} tokens) and --model "
            f"{test_name!r} ({len(vt)} tokens) differ ({diff} entries not shared): both models "
            "must use one tokenizer"
        )
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(base_tok, name, None) != getattr(test_tok, name, None):
            raise CliError(f"the tokenizers of --base and --model differ in {name} "
                           f"({getattr(base_tok, name, None)} vs "
                           f"{getattr(test_tok, name, None)}): both models must use one "
                           "tokenizer")


def _tokenize(tokenizer, test_tokenizer, documents, add_special_tokens):
    import torch

    docs = []
    for i, text in enumerate(documents):
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if ids != test_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]:
            raise CliError(f"the tokenizers of --base and --model split document {i} "
                           "differently: both models must use one tokenizer")
        docs.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
    length = max(1, max(len(d) for d in docs))
    ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros(len(docs), length, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = d
        mask[i, : len(d)] = 1
    return docs, ids, mask


def _pct(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.3f}%"


def summary(figures) -> str:
    """llama.cpp-style blocks: perplexity, KL divergence, token probability statistics."""
    f = figures
    rows = [("====== Perplexity statistics ======", None),
            ("Mean PPL(base)", f"{human(f['perplexity_base'], 6)} ± "
                               f"{human(f['perplexity_base_stderr'], 6)}"),
            ("Mean PPL(Q)", f"{human(f['perplexity_test'], 6)} ± "
                            f"{human(f['perplexity_test_stderr'], 6)}"),
            ("Cor(ln(PPL(Q)), ln(PPL(base)))", _pct(f["nll_correlation"])),
            ("Mean ln(PPL(Q)/PPL(base))", f"{human(f['ln_ppl_ratio'], 6)} ± "
                                          f"{human(f['ln_ppl_ratio_stderr'], 6)}"),
            ("Mean PPL(Q)/PPL(base)", f"{human(f['ppl_ratio'], 6)} ± "
                                      f"{human(f['ppl_ratio_stderr'], 6)}"),
            ("", None), ("====== KL divergence statistics ======", None),
            ("Mean    KLD", f"{human(f['kl_mean'], 6)} ± {human(f['kl_mean_stderr'], 6)}"),
            ("Maximum KLD", human(f["kl_max"], 6))]
    for pc, value in f["kl_percentiles"].items():
        rows.append(("Median  KLD" if pc == 50.0 else f"{pc:4.1f}%   KLD", human(value, 6)))
    rows += [("Minimum KLD", human(f["kl_min"], 6)),
             ("", None), ("====== Token probability statistics ======", None),
             ("Mean    Δp", f"{_pct(f['delta_p_mean'])} ± {_pct(f['delta_p_mean_stderr'])}")]
    for pc, value in f["delta_p_percentiles"].items():
        label = {100.0: "Maximum Δp", 50.0: "Median  Δp", 0.0: "Minimum Δp"}.get(
            pc, f"{pc:4.1f}%   Δp")
        rows.append((label, _pct(value)))
    rows += [("RMS Δp", f"{_pct(f['delta_p_rms'])} ± {_pct(f['delta_p_rms_stderr'])}"),
             ("Same top p", f"{_pct(f['top1_agreement'])} ± "
                            f"{_pct(f['top1_agreement_stderr'])}"),
             ("", None),
             ("tokens compared", human(f["num_tokens"])),
             ("windows", f"{f['mode']}, window {f['window']}"
                         + (f", stride {f['stride']}" if f["mode"] == "sliding" else "")),
             ("ran on", f"backend {f['backend']}; base on {f['device_base']}, "
                        f"model on {f['device']}"),
             ("seconds", human(f["seconds"], 2))]
    width = max(len(k) for k, v in rows if v is not None)
    return "\n".join(k if v is None else f"{k:<{width}} : {v}" for k, v in rows)


def _per_token_rows(tokenizer, docs, tokens, scored):
    for d, ids in enumerate(docs):
        fields = {name: getattr(tokens, name)[d, : len(ids)].tolist()
                  for name in ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base",
                               "argmax_test")}
        ok = scored[d, : len(ids)].tolist()
        for pos, tid in enumerate(ids.tolist()):
            row = {"document": d, "position": pos, "token_id": tid,
                   "token": token_text(tokenizer, tid)}
            for name, values in fields.items():
                value = values[pos] if ok[pos] else None
                row[name] = value
                if name.startswith("argmax") and value is not None:
                    row[name + "_token"] = token_text(tokenizer, value)
            yield row


def _plot_figure(tokens, scored, title, window):
    import torch

    plt = pyplot()
    kl = torch.where(scored, tokens.kl.double(), torch.zeros((), dtype=torch.float64))
    count = scored.double().sum(0)
    keep = count > 0
    positions = torch.arange(kl.shape[1])[keep]
    mean = kl.sum(0)[keep] / count[keep]
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    ax.plot(positions.numpy(), mean.numpy(), lw=0.6, label="mean KL over documents")
    if window is not None and window < kl.shape[1]:
        ax.axvline(window, color="grey", ls="--", lw=1, label=f"window ({window} tokens)")
    ax.set_xlabel("token position in document")
    ax.set_ylabel("KL(base ‖ model), nats")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    values = tokens.kl[scored].double()
    values = values[torch.isfinite(values)]
    floor = 1e-8
    hist.hist(torch.log10(values.clamp_min(floor)).numpy(), bins=60)
    hist.set_xlabel(f"log10 KL per token (values below {floor:g} at {math.log10(floor):g})")
    hist.set_ylabel("tokens")
    hist.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@one_line_errors("compare")
def run(args) -> int:
    _check_options(args)
    docs = read_documents(args)  # output paths are checked there, before the models load
    with lock_outputs(output_paths(args)):
        return _compare_documents(args, [doc.text for doc in docs])


def _compare_documents(args, documents) -> int:
    on = device(args.device)
    on_base = device(args.device_base, "--device-base") if args.device_base else on
    base, base_tok = load_model(args.base, args.dtype, on_base)
    model, test_tok = load_model(args.model, args.dtype, on)
    check_same_tokenizer(base_tok, test_tok, args.base, args.model)
    contexts = [c for c in (context_length(base), context_length(model)) if c]
    window = args.window or (min(contexts) if contexts else None)
    if window is None:
        raise CliError("the model configs state no context length: pass --window")
    if contexts and window > min(contexts):
        raise CliError(f"--window {window} is longer than the context length "
                       f"{min(contexts)} of one of the models: pass --window "
                       f"{min(contexts)} or less")
    stride = args.stride
    if args.mode == "sliding" and stride is None:
        stride = max(1, window // 2)
    backend = resolved_backend(args.backend, model)
    docs, ids, mask = _tokenize(base_tok, test_tok, documents, args.mode != "rolling")
    prefix_token_id = args.prefix_token_id
    if args.mode == "llamacpp":
        # as pplfast score: llama.cpp's BOS first in every chunk when the tokenizer adds one
        try:
            prefix_token_id = llamacpp_bos(base, base_tok, prefix_token_id)
        except ValueError as exc:
            raise CliError(first_line(exc)) from None
    start = time.perf_counter()
    try:
        result = compare_models(base, model, ids, mask, window=window, stride=stride,
                                mode=args.mode, prefix_token_id=prefix_token_id,
                                batch_size=args.batch_size, backend=args.backend,
                                progress=progress_wanted(args))
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        raise CliError(first_line(exc)) from None
    seconds = time.perf_counter() - start
    figures = {
        "pplfast_version": __version__, "base": args.base, "model": args.model,
        "num_documents": len(documents), **result.as_dict(), "seconds": seconds,
        "mode": args.mode, "window": window, "stride": stride if args.mode == "sliding" else None,
        "device": str(on), "device_base": str(on_base), "backend": backend,
    }
    emit_figures(args.json, figures, summary(figures))
    tokens, scored = result.token_comparison, result.scored
    if args.per_token:
        write_rows(args.per_token, _per_token_rows(base_tok, docs, tokens, scored))
    if args.plot:
        save_figure(_plot_figure(tokens, scored, f"{args.model} against {args.base}: KL per "
                                                 "token", window), args.plot)
    return 0
