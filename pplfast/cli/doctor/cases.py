"""The inputs of ``pplfast doctor``'s checks: one table of cases, each run for every public op of
its family, every dtype and every available backend.

A logits case builds float64 logits ``(..., V)`` and targets; the ops of the logits family
(``token_nll``, ``token_stats``, ``compare``) take them as they are, ``compare`` with a second
tensor from a second draw of the same case whose rows are rolled by one (its special values land
on other positions than the base's, so a row may be special in either model, or both). A hidden
case builds hidden states, a weight, a bias and targets for ``linear_token_nll``,
``linear_token_stats`` and ``linear_compare`` alike.

Every case is drawn from a generator seeded by :func:`case_seed`, the same in every process, so
a failure on one machine reproduces on another.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from ... import _env

INF, NAN = float("inf"), float("nan")
IGNORE = -100
LOGITS_OPS = ("token_nll", "token_stats", "compare")
LINEAR_OPS = ("linear_token_nll", "linear_token_stats", "linear_compare")
STATS_OPS = ("token_stats", "linear_token_stats")


@dataclass(frozen=True)
class Case:
    """One check per dtype and backend: ``make(dtype, device, gen)`` returns ``(args, opts)`` of
    ``pplfast.<op>``."""

    op: str
    name: str
    make: Callable
    interpreter: bool = True  # small enough for Triton's interpreter
    # rows whose largest logits sit near the top of the dtype's range: every bound is taken on
    # the row shifted by its maximum (which changes no output), see pplfast.cli.doctor.checks
    relative_to_max: bool = False


def case_seed(case: Case, dtype_name: str) -> int:
    """The generator seed of one check: a stable hash of its names, the same in every process
    (Python's ``hash`` of a string changes per process), so a failure can be reproduced."""
    return zlib.crc32(f"{case.op}/{case.name}/{dtype_name}".encode())


@dataclass
class Logits:
    x: torch.Tensor  # float64 (..., V)
    t: torch.Tensor  # int64 (...)
    opts: dict = field(default_factory=dict)
    top_k: int = 5  # token_stats only
    view: Optional[Callable] = None  # applied after the cast: a strided view of the logits


@dataclass
class Hidden:
    h: torch.Tensor  # float64 (..., D)
    w: torch.Tensor  # float64 (V, D)
    b: Optional[torch.Tensor]  # float64 (V,)
    t: torch.Tensor
    opts: dict = field(default_factory=dict)
    top_k: int = 0  # linear_token_stats only: 0 takes the fused kernel on Triton


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _targets(gen, V, *shape):
    return torch.randint(0, V, shape, generator=gen)


def _top(dtype) -> float:
    """M, a logit near the top of the dtype's range: 3e38 for float32 and bfloat16 (issue rows
    of the float32 extremes), about 5.8e4 for float16."""
    return min(3e38, 0.88 * torch.finfo(dtype).max)


# ---- logits cases ------------------------------------------------------------------------------

def _plain(gen, dtype):
    return Logits(_randn(gen, 6, 507, scale=3.0), _targets(gen, 507, 6), top_k=0)


def _options(gen, dtype):
    x = _randn(gen, 1, 3, 7, scale=20.0)
    t = _targets(gen, 7, 1, 3)
    t[0, 1] = IGNORE
    return Logits(x, t, dict(softcap=5.0, temperature=0.7, shift=True), top_k=3)


def _special_rows(gen, V=129):
    """Rows of each special value of docs/ops.md's table ("Special values"), and an ignored one."""
    x, t = _randn(gen, 8, V, scale=3.0), _targets(gen, V, 8)
    x[0, 3] = NAN                        # NaN in a row: NaN
    x[1, (int(t[1]) + 1) % V] = INF      # +inf at a non-target entry: NLL +inf
    x[2, ::3] = -INF                     # -inf entries: probability 0
    x[2, int(t[2])] = 0.5
    x[3] = -INF                          # every entry -inf: NaN
    x[4, int(t[4])] = -INF               # the target at -inf: NLL +inf
    t[5] = IGNORE                        # ignored: 0, not read
    x[6] *= 3000                         # magnitudes around 1e4
    x[7, int(t[7])] = INF                # +inf at the target: NaN
    return x, t


def _special(gen, dtype, **opts):
    x, t = _special_rows(gen)
    if opts.pop("shift", False):
        # position i predicts targets[i + 1]: lay the rows out so that each keeps its target
        V = x.shape[-1]
        x = torch.cat([x.reshape(2, 4, V), _randn(gen, 2, 1, V)], dim=1)
        t = torch.cat([_targets(gen, V, 2, 1), t.reshape(2, 4)], dim=1)
        opts["shift"] = True
    return Logits(x, t, opts, top_k=5)


def _extremes_pair(gen, dtype, **opts):
    """Issue rows: ``[M, M, -1]`` (NLL log 2 at either M) and its permutations, M = 3e38."""
    m = _top(dtype)
    x = torch.tensor([[m, m, -1.0], [m, m, -1.0], [-1.0, m, m], [m, -1.0, m], [m, m, -1.0]],
                     dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 1, IGNORE])
    return Logits(x, t, opts, top_k=2)


def _extremes_equal(gen, dtype, **opts):
    """300 equal logits of M (NLL log 300), and one entry of -1 among 299 of M."""
    m = _top(dtype)
    x = torch.full((3, 300), m, dtype=torch.float64)
    x[1, 17] = -1.0
    t = torch.tensor([5, 17, 299])
    return Logits(x, t, opts, top_k=5)


def _split(gen, dtype):
    v = 200_003 if not _env.interpreting() else 20_011
    return Logits(_randn(gen, 2, v, scale=3.0), _targets(gen, v, 2), top_k=0)


def _strided(gen, dtype):
    x = _randn(gen, 9, 1002, scale=3.0)
    return Logits(x, _targets(gen, 501, 3), dict(temperature=1.5), top_k=4,
                  view=lambda z: z[::3, ::2])


# ---- hidden-states cases -----------------------------------------------------------------------

def _hidden(gen, n, d, v, bias=False):
    b = _randn(gen, v) if bias else None
    return _randn(gen, n, d), _randn(gen, v, d, scale=2.0 / math.sqrt(d)), b


def _linear_plain(gen, dtype):
    h, w, _ = _hidden(gen, 9, 123, 507)
    return Hidden(h, w, None, _targets(gen, 507, 9))


def _linear_options(gen, dtype):
    h, w, b = _hidden(gen, 10, 64, 300, bias=True)
    t = _targets(gen, 300, 2, 5)
    t[0, 2] = IGNORE
    return Hidden(h.reshape(2, 5, 64), w, b, t, dict(softcap=4.0, temperature=0.8, shift=True),
                  top_k=4)


def _linear_special(gen, dtype, top_k=0, **opts):
    """Special values through the bias (a +inf and a -inf column in every row) and the hidden
    states (a NaN row), an ignored row, targets at the +inf and at the -inf column."""
    V = 257
    h, w, b = _hidden(gen, 8, 32, V, bias=True)
    t = _targets(gen, V, 8)
    pos, neg = int(t[4]) ^ 1, (int(t[4]) + 7) % V
    b[pos], b[neg] = INF, -INF
    t[0], t[3] = pos, neg
    h[1, 4] = NAN
    t[2] = IGNORE
    if opts.get("shift"):
        h, t = h.reshape(2, 4, 32), torch.cat([_targets(gen, V, 2, 1), t.reshape(2, 4)[:, :3]],
                                              dim=1)
    return Hidden(h, w, b, t, opts, top_k=top_k)


def _linear_extremes(gen, dtype, v=3, **opts):
    """The logits rows of the extremes through the bias (a zero weight), so the hidden path sees
    exactly the logits of the logits-path case."""
    rows = (_extremes_pair if v == 3 else _extremes_equal)(gen, dtype)
    n, d = rows.x.shape[0], 16
    # one bias row for every position ([M, M, -1], or -1 among 299 of M), each its own target
    return Hidden(_randn(gen, n, d), torch.zeros(v, d, dtype=torch.float64), rows.x[1].clone(),
                  rows.t, opts, top_k=0 if v == 3 else 3)


# ---- the table ---------------------------------------------------------------------------------

# the special values again under each option: the transform must not hide a NaN (a tanh maps NaN
# to +-1 when the NaN check comes after it), nor overflow near the top of the range
_SPECIAL_OPTIONS = [
    ("", {}),
    (", softcap", dict(softcap=30.0)),
    (", temperature", dict(temperature=0.7)),
    (", softcap+temperature+shift", dict(softcap=30.0, temperature=0.7, shift=True)),
]
_EXTREME_OPTIONS = [
    ("", {}),
    (", temperature 0.5", dict(temperature=0.5)),
    (", softcap+temperature 0.5", dict(softcap=30.0, temperature=0.5)),
]

LOGITS_CASES = [
    ("plain", _plain, {}),
    ("softcap+temperature+shift+ignored", _options, {}),
    *[(f"special values{suffix}", functools.partial(_special, **opts), {})
      for suffix, opts in _SPECIAL_OPTIONS],
    *[(f"extremes [M, M, -1]{suffix}", functools.partial(_extremes_pair, **opts),
       dict(relative_to_max=True)) for suffix, opts in _EXTREME_OPTIONS],
    *[(f"extremes, 300 equal{suffix}", functools.partial(_extremes_equal, **opts),
       dict(relative_to_max=True)) for suffix, opts in _EXTREME_OPTIONS],
    ("vocabulary split (few rows, long V)", _split, {}),
    ("strided view", _strided, {}),
]

LINEAR_CASES = [
    ("plain", _linear_plain, {}),
    ("bias+softcap+temperature+shift+ignored", _linear_options, {}),
    *[(f"special values{suffix}", functools.partial(_linear_special, top_k=4 * (i % 2), **opts),
       {}) for i, (suffix, opts) in enumerate(_SPECIAL_OPTIONS)],
    *[(f"extremes [M, M, -1] (bias){suffix}",
       functools.partial(_linear_extremes, v=3, **opts), dict(relative_to_max=True))
      for suffix, opts in _EXTREME_OPTIONS],
    *[(f"extremes, 300 equal (bias){suffix}",
       functools.partial(_linear_extremes, v=300, **opts), dict(relative_to_max=True))
      for suffix, opts in _EXTREME_OPTIONS],
]


def _cast(z, dtype, device):
    return None if z is None else z.to(dtype).to(device)


def _logits_make(builder, op):
    def make(dtype, device, gen):
        case = builder(gen, dtype)
        opts = dict(case.opts)
        if op == "token_stats":
            opts["top_k"] = min(case.top_k, case.x.shape[-1])
        view = case.view or (lambda z: z)
        x, t = view(_cast(case.x, dtype, device)), case.t.to(device)
        if op != "compare":
            return (x, t), opts
        # the second model: another draw of the case, rows rolled by one
        other = builder(gen, dtype)
        y = view(_cast(other.x.roll(1, dims=-2), dtype, device))
        return (x, y, t), opts

    return make


def _linear_make(builder, op):
    def make(dtype, device, gen):
        case = builder(gen, dtype)
        opts = dict(case.opts)
        h, w, b = (_cast(z, dtype, device) for z in (case.h, case.w, case.b))
        t = case.t.to(device)
        if op == "linear_token_stats":
            opts["top_k"] = min(case.top_k, case.w.shape[0])
        if op != "linear_compare":
            return (h, w, t), dict(opts, bias=b)
        other = builder(gen, dtype)
        h2, w2, b2 = (_cast(z, dtype, device) for z in (other.h.roll(1, dims=-2), other.w,
                                                        other.b))
        return (h, w, h2, w2, t), dict(opts, bias_base=b, bias_test=b2)

    return make


def _expand() -> List[Case]:
    cases = []
    for ops, table, make in ((LOGITS_OPS, LOGITS_CASES, _logits_make),
                             (LINEAR_OPS, LINEAR_CASES, _linear_make)):
        for op in ops:
            for name, builder, extra in table:
                cases.append(Case(op, name, make(builder, op), **extra))
    return cases


CASES: List[Case] = _expand()
