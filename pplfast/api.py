"""The NLL ops, declared: ``token_nll``, ``linear_token_nll`` and their perplexities.

Each function states its contract and hands the call to the front door (``pplfast._frontend``:
validation, copy-free layout, backend resolution, the registered custom op, the result); no
numerics and no argument handling live here. Also the backend names for the layers above:
:data:`BACKENDS`, :class:`BackendUnavailableError` and :func:`resolve_backend`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _frontend
from ._dispatch import BACKENDS, BackendUnavailableError
from ._dispatch import module as _module
from ._dispatch import resolve as _resolve
from .vocab_parallel import VocabShard

__all__ = ["BACKENDS", "BackendUnavailableError", "check_backend", "linear_perplexity",
           "linear_token_nll", "perplexity", "resolve_backend", "token_nll"]


def resolve_backend(backend: str, device) -> str:
    """The concrete backend (``"cpu"``, ``"triton"``, ``"cuda"`` or ``"reference"``) that
    ``backend`` names for tensors on ``device``, as every op resolves it (``"auto"`` and
    ``PPLFAST_BACKEND`` included); raises ``ValueError`` or :class:`BackendUnavailableError`
    saying why it cannot run there."""
    return _resolve(backend, torch.device(device))


def check_backend(backend: str) -> None:
    """Raise :class:`BackendUnavailableError` saying what to install when the code of a concrete
    backend (``"cpu"``, ``"triton"``, ``"cuda"``, ``"reference"``) cannot be loaded here: the
    native extension missing from the install, or no triton. Which tensors it can run on is
    :func:`resolve_backend`'s answer."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _module(backend)


def token_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    check_targets: bool = True,
    vocab_shard: Optional[VocabShard] = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood, in one pass over the logits.

    Equals ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=ignore_index)``
    cast to float32, where ``z = logits``, soft-capped (``softcap * tanh(z / softcap)``) when
    ``softcap`` is given, then divided by ``temperature``. No ``(..., V)`` temporary is built.

    Args:
        logits: ``(..., V)`` float32, float16 or bfloat16, any strides.
        targets: ``(...)`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index: positions with this target get NLL 0. Compared as an integer, not in
            the targets' dtype: a value that dtype cannot hold (``2**40`` with int32 targets)
            equals no target, and every position is scored.
        shift: position ``t`` predicts ``targets[..., t + 1]`` (pass ``input_ids``); the
            output then has shape ``(..., T - 1)``.
        softcap: cap applied as ``softcap * tanh(z / softcap)`` (Gemma 2 style), or None.
        temperature: divide the (capped) logits by this, > 0.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        check_targets: check that every target is ``ignore_index`` or in ``[0, V)`` (one host
            sync per call); pass False only for targets already validated, since an
            out-of-range target is then an out-of-bounds read.
        vocab_shard: this rank's slice of a vocabulary split across the ranks of a process
            group (:class:`pplfast.VocabShard`); ``logits`` then holds the columns
            ``[start, stop)`` only, the targets stay global ids, and every rank of the group
            returns the full result of its rows (one small collective per call, no gathered
            logits; docs/vocab_parallel.md). A ``DTensor`` ``logits`` sharded on the vocabulary
            (``Shard(-1)``) needs no ``vocab_shard``: its mesh gives the group.

    Returns:
        float32 tensor of shape ``(...)`` (or ``(..., T - 1)`` with ``shift``).

    The work runs in the custom op ``torch.ops.pplfast.token_nll``. Under ``torch.compile``
    (``fullgraph=True`` works) validation and backend choice run at trace time and the op is one
    node of the graph; the target-range check runs inside the op at run time, as in eager mode.
    """
    return _frontend.token_nll(logits, targets, ignore_index=ignore_index, shift=shift,
                               softcap=softcap, temperature=temperature, backend=backend,
                               check_targets=check_targets, vocab_shard=vocab_shard)


def linear_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    check_targets: bool = True,
    vocab_shard: Optional[VocabShard] = None,
) -> torch.Tensor:
    """Per-token NLL of the output layer applied to hidden states, never building the logits.

    Equals ``token_nll(F.linear(hidden, weight, bias), targets, ...)`` computed in float64.

    Args:
        hidden: ``(..., D)`` float32, float16 or bfloat16 final hidden states.
        weight: ``(V, D)`` output-layer weight (the ``nn.Linear`` / ``lm_head`` layout), same
            dtype as ``hidden``.
        targets: ``(...)`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``.
        bias: optional ``(V,)`` output-layer bias.
        ignore_index, shift, softcap, temperature, backend, check_targets: as in
            :func:`token_nll`; the op is ``torch.ops.pplfast.linear_token_nll``.
        vocab_shard: as in :func:`token_nll`; ``weight`` and ``bias`` then hold the
            vocabulary rows ``[start, stop)`` only (a ``DTensor`` weight with ``Shard(0)``
            needs no ``vocab_shard``).

    Returns:
        float32 tensor of shape ``(...)`` (or ``(..., T - 1)`` with ``shift``).
    """
    return _frontend.linear_token_nll(hidden, weight, targets, bias=bias,
                                      ignore_index=ignore_index, shift=shift, softcap=softcap,
                                      temperature=temperature, backend=backend,
                                      check_targets=check_targets, vocab_shard=vocab_shard)


def perplexity(logits: torch.Tensor, targets: torch.Tensor, **options) -> torch.Tensor:
    """``exp(sum(nll) / count(scored))`` of :func:`token_nll`; 0-dim float32, NaN if nothing is scored.

    Takes the same keyword options as :func:`token_nll` (``check_targets`` included); the sum is
    taken in float64.
    """
    nll = token_nll(logits, targets, **options)
    return _frontend.perplexity(nll, targets, options.get("ignore_index", -100),
                                options.get("shift", False))


def linear_perplexity(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **options
) -> torch.Tensor:
    """Perplexity from hidden states and the output layer; see :func:`linear_token_nll`."""
    nll = linear_token_nll(hidden, weight, targets, **options)
    return _frontend.perplexity(nll, targets, options.get("ignore_index", -100),
                                options.get("shift", False))
