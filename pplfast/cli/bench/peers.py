"""What is timed: pplfast and the peers it is compared with, per path."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from ... import api, comparison, stats


@dataclass
class Impl:
    name: str  # stable key (JSON, memory worker)
    label: str  # table text
    role: str  # "pplfast", "baseline" or "floor"
    fn: Callable[..., torch.Tensor]
    clobbers_input: bool = False  # writes into its first input: gets its own copy
    one_tensor: bool = False  # reads one of compare's two logits tensors (its GB/s counts one)


def _first(out):
    """Some peers return (loss, extra) or an output object; keep the loss tensor."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "loss", out)


def implementations(path: str, device: torch.device, backend: str):
    """``(impls, skipped)``: the implementations timed for ``path`` here, and why others are not."""
    impls: List[Impl] = []
    skipped: List[Tuple[str, str]] = []
    try:
        from ...api import resolve_backend

        resolved = resolve_backend(backend, device)
    except Exception:  # the preflight call reports the real error
        resolved = backend
    label = f"pplfast[{resolved}]"
    if path == "stats":
        return _stats_implementations(label, backend), skipped
    if path == "compare":
        impls.append(Impl("pplfast", label, "pplfast",
                          lambda a, b, t: comparison.compare(a, b, t, backend=backend)))
        impls.append(Impl("torch_kl", "log_softmax+kl_div+argmax", "baseline", _torch_compare))
        impls.append(Impl("token_nll_one", f"token_nll[{resolved}] of one tensor", "baseline",
                          lambda a, b, t: api.token_nll(a, t, backend=backend), one_tensor=True))
        return impls, skipped
    if path == "logits":
        impls.append(Impl("pplfast", label, "pplfast",
                          lambda x, t: api.token_nll(x, t, backend=backend)))
        impls.append(Impl("cross_entropy", "F.cross_entropy", "baseline",
                          lambda x, t: F.cross_entropy(x, t, reduction="none")))
        impls.append(Impl("log_softmax_gather", "log_softmax+gather", "baseline",
                          lambda x, t: F.log_softmax(x, dim=-1).gather(-1, t[:, None]).squeeze(-1).neg()))
        if device.type == "cuda":
            try:
                from liger_kernel.transformers.functional import liger_cross_entropy
            except Exception as exc:  # optional peer
                skipped.append(("liger_cross_entropy", f"liger-kernel not importable ({_one_line(exc)})"))
            else:
                # Liger's forward may write the gradient into the logits it is given
                impls.append(Impl("liger_cross_entropy", "Liger cross_entropy", "baseline",
                                  lambda x, t: _first(liger_cross_entropy(x, t, reduction="none")),
                                  clobbers_input=True))
        else:
            skipped.append(("liger_cross_entropy", "GPU only"))
        return impls, skipped

    impls.append(Impl("pplfast", label, "pplfast",
                      lambda h, w, t: api.linear_token_nll(h, w, t, backend=backend)))
    fused, why_not = _fused_fp32_impl(device)
    if fused is not None:
        impls.append(fused)
    else:
        skipped.append((FUSED_FP32, why_not))
    impls.append(Impl("linear_cross_entropy_unfused", "F.linear+F.cross_entropy", "baseline",
                      lambda h, w, t: F.cross_entropy(F.linear(h, w), t, reduction="none")))
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        impls.append(Impl("torch_linear_cross_entropy", "F.linear_cross_entropy[chunked]", "baseline",
                          lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="none", options=options)))
    else:
        skipped.append(("torch_linear_cross_entropy",
                        f"torch {torch.__version__} has no F.linear_cross_entropy (needs >= 2.13)"))
    if device.type == "cuda":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
        except Exception as exc:
            skipped.append(("cut_cross_entropy", f"cut-cross-entropy not importable ({_one_line(exc)})"))
        else:
            impls.append(Impl("cut_cross_entropy", "Cut Cross-Entropy", "baseline",
                              lambda h, w, t: _first(cce_linear_cross_entropy(h, w, t, impl="cce", reduction="none"))))
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception as exc:
            skipped.append(("liger_fused_linear_cross_entropy", f"liger-kernel not importable ({_one_line(exc)})"))
        else:
            impls.append(Impl("liger_fused_linear_cross_entropy", "Liger fused linear CE", "baseline",
                              lambda h, w, t: _first(liger_fused_linear_cross_entropy(h, w, t, reduction="none"))))
    else:
        skipped.append(("cut_cross_entropy", "GPU only"))
        skipped.append(("liger_fused_linear_cross_entropy", "GPU only"))
    impls.append(Impl("matmul", "matmul hidden@weight.T", "floor", lambda h, w, t: h @ w.T))
    return impls, skipped


FUSED_FP32 = "pplfast_triton_fused_fp32"


def fused_fp32_nll(hidden, weight, targets, *, sm_count):
    """The fused Triton hidden-states kernel with IEEE float32 products (no TF32), called below
    pplfast's routing, which sends float32 without TF32 to the chunked cuBLAS path instead
    (``pplfast._triton``). On float32 rows its ratio to ``pplfast[triton]`` is the measurement
    that decides that rule; on float16/bfloat16 rows it is the path pplfast takes anyway."""
    from ... import _env
    from ...kernels.linear_token_nll import linear_token_nll_forward

    return linear_token_nll_forward(hidden, weight, None, targets, -100, None, 1.0,
                                    sm_count=sm_count, allow_tf32=False,
                                    autotune=_env.autotune())


def _fused_fp32_impl(device: torch.device):
    """``(Impl, None)`` for :func:`fused_fp32_nll` where it can run, else ``(None, why)``."""
    if device.type != "cuda":
        return None, "GPU only"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return None, "the fused kernel needs CUDA capability >= 8.0"
    try:
        from ... import _env
        from ...kernels import linear_token_nll  # noqa: F401  (imports triton)
    except Exception as exc:
        return None, f"triton not importable ({_one_line(exc)})"
    sm_count = _env.sm_count(device)
    return Impl(FUSED_FP32, "pplfast[triton-fused-fp32]", "baseline",
                lambda h, w, t: fused_fp32_nll(h, w, t, sm_count=sm_count)), None


def _torch_compare(a, b, t):
    """What a user writes today: both log-softmaxes, the KL per row, both argmaxes."""
    lp, lq = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    return kl, a.argmax(-1), b.argmax(-1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _torch_stats(x, t, top_k=0):
    """The statistics as a user computes them today: the whole (N, V) log-softmax in float32."""
    logp = F.log_softmax(x.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    max_logprob, argmax = logp.max(-1)
    rank = (logp > logp.gather(-1, t[:, None])).sum(-1)
    top = logp.topk(top_k, dim=-1) if top_k else None
    return entropy, max_logprob, argmax, rank, top


def _stats_implementations(label: str, backend: str) -> List[Impl]:
    """``--path stats``: token_stats (top_k 0, then 5; the first is the speed-up's reference),
    token_nll for scale, and the PyTorch expression with and without ``topk(5)``."""
    return [
        Impl("pplfast_stats", f"{label} token_stats", "pplfast",
             lambda x, t: stats.token_stats(x, t, backend=backend).entropy),
        Impl("pplfast_stats_top5", f"{label} token_stats top_k=5", "pplfast",
             lambda x, t: stats.token_stats(x, t, top_k=5, backend=backend).entropy),
        Impl("pplfast_token_nll", f"{label} token_nll", "baseline",
             lambda x, t: api.token_nll(x, t, backend=backend)),
        Impl("torch_stats", "log_softmax+stats", "baseline", lambda x, t: _torch_stats(x, t)[0]),
        Impl("torch_stats_top5", "log_softmax+stats+topk(5)", "baseline",
             lambda x, t: _torch_stats(x, t, 5)[0]),
    ]
