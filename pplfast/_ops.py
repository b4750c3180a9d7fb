"""The two public ops as ``torch.library`` custom ops (``pplfast::token_nll``,
``pplfast::linear_token_nll``), registered in Python above the pybind11 layer.

``pplfast.api`` validates arguments, normalises layouts and resolves the backend in Python, then
calls one of these ops; the op's body checks the target range (when asked), counts the scored
rows and runs the backend's launcher. Under ``torch.compile`` the ops are leaves of the graph:
their fake implementations give the output's shape, dtype and device without running anything,
so an eval step with ``fullgraph=True`` compiles, and at run time the op's body runs as in eager
mode, target-range check (one host sync) included unless ``check_targets=False``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _validate
from ._chunked import _select_scored


@torch.library.custom_op("pplfast::token_nll", mutates_args=())
def token_nll(logits3: torch.Tensor, targets: torch.Tensor, ignore_index: int,
              softcap: Optional[float], temperature: float, backend: str,
              check_targets: bool) -> torch.Tensor:
    """float32 ``(targets.numel(),)`` NLL of the rows of ``logits3`` (B, T, V).

    ``targets`` holds B * T ids in any shape (its shape names positions in the range error);
    ``backend`` is a concrete backend name (already resolved).
    """
    V = logits3.shape[-1]
    if check_targets:
        _validate.scored_targets(targets, V, ignore_index, check=True, count=False)
    flat = targets.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() == 0 or V == 0:
        # no rows, or every target is ignore_index (the range check allows nothing else at V=0)
        return torch.zeros(flat.numel(), dtype=torch.float32, device=logits3.device)
    return _dispatch.module(backend).token_nll(logits3, flat, ignore_index, softcap, temperature)


@token_nll.register_fake
def _token_nll_fake(logits3, targets, ignore_index, softcap, temperature, backend, check_targets):
    return logits3.new_empty(targets.numel(), dtype=torch.float32)


@torch.library.custom_op("pplfast::linear_token_nll", mutates_args=())
def linear_token_nll(hidden2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     targets: torch.Tensor, ignore_index: int, softcap: Optional[float],
                     temperature: float, backend: str, check_targets: bool) -> torch.Tensor:
    """float32 ``(targets.numel(),)`` NLL of ``hidden2 @ weight.T + bias`` (hidden2: (N, D)).

    One host sync: the scored rows are counted (they size the gather of the rows to score) in
    the same reduction as the target-range check.
    """
    V, D = weight.shape
    mask, count = _validate.scored_targets(targets, V, ignore_index, check=check_targets,
                                           count=D > 0)
    flat = targets.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() == 0 or V == 0:
        return torch.zeros(flat.numel(), dtype=torch.float32, device=hidden2.device)
    launchers = _dispatch.module(backend)
    if D == 0:
        # every row's logits are the bias (or zeros): score one row through a stride-0 view
        row = bias if bias is not None else weight.new_zeros(V)
        return launchers.token_nll(row.expand(1, flat.numel(), V), flat, ignore_index, softcap,
                                   temperature)
    scored = _select_scored(flat, ignore_index, mask=mask.reshape(-1), count=count)
    return launchers.linear_token_nll(hidden2, weight, bias, flat, ignore_index, softcap,
                                      temperature, scored=scored)


@linear_token_nll.register_fake
def _linear_token_nll_fake(hidden2, weight, bias, targets, ignore_index, softcap, temperature,
                           backend, check_targets):
    return hidden2.new_empty(targets.numel(), dtype=torch.float32)
