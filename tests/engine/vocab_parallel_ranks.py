"""The vocab-parallel cases, run in P processes on gloo: spawned once per world size by
``test_vocab_parallel.py`` (``python vocab_parallel_ranks.py WORLD OUT``), each rank running every
case of its world in the same order and writing ``{case: None or the error}`` to
``OUT.rank<r>.json``.

Every rank builds the same full inputs (each case seeds the generator from its name) and passes
its slice; the expectation is the float64 reference (``pplfast.reference``) on the whole
vocabulary, in the same process. Layouts: ``from_vocab`` (V = 1001 split as ``torch.chunk``
does: uneven), ``explicit`` (uneven slices in reverse rank order, no ``vocab_size``: the target
range is checked after the exchange) and, over 3 ranks, ``empty`` (one rank holds no entry).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import traceback
import zlib

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

V = 1001
HEADER_WORDS = 5  # pplfast._vocab_merge.HEADER, restated: a change of the layout shows here
T = 16  # rows per input: one per special case, and ordinary ones
D = 16
INF, NAN = float("inf"), float("nan")
OPTIONS = {
    "plain": dict(),
    "cap30-t0.7": dict(softcap=30.0, temperature=0.7),
    "t0.5-shift": dict(temperature=0.5, shift=True),
    "cap3-t3": dict(softcap=3.0, temperature=3.0),
}
LOGIT_OPS = ["token_nll", "perplexity", "token_stats", "token_stats_top5", "compare"]
HIDDEN_CASES = ["plain", "slice_ninf", "nan_row", "pinf_col", "ties"]
LINEAR_OPS = ["linear_token_nll", "linear_token_stats_top3", "linear_compare"]
BACKENDS = ["reference", "cpu", "triton"]  # triton: the interpreter, or a GPU's kernels
TRITON_LAYOUT = {2: "from_vocab", 3: "empty"}


def layouts(world: int):
    """Layout name -> the [start, stop) of each rank and whether vocab_size is passed."""
    step = -(-V // world)
    out = {"from_vocab": ([(min(r * step, V), min(r * step + step, V)) for r in range(world)],
                          True)}
    if world == 2:
        out["explicit"] = ([(400, V), (0, 400)], False)
    elif world == 3:
        out["explicit"] = ([(600, V), (0, 250), (250, 600)], False)
        out["empty"] = ([(0, 700), (700, 700), (700, V)], True)
    return out


def case_names(world: int) -> list:
    names = []
    for layout in layouts(world) if world in (2, 3) else ():
        for backend in BACKENDS:
            if backend == "triton" and layout != TRITON_LAYOUT[world]:
                continue  # the interpreter is slow: one layout per world
            for opt in OPTIONS:
                names += [f"{op}/{layout}/{opt}/{backend}" for op in LOGIT_OPS]
            for hidden in HIDDEN_CASES:
                names += [f"{op}/{layout}/{hidden}/{backend}" for op in LINEAR_OPS]
    names += [name for name, worlds in EXTRA.items() if world in worlds]
    return names


# ---- inputs -------------------------------------------------------------------------------------

def _slices(bounds):
    return [(a, b) for a, b in sorted(bounds) if b > a]


def special_logits(bounds):
    """(logits (1, T, V), test logits (1, T, V), targets (1, T)): one special case per row, placed
    relative to the layout's slices (first, second and last non-empty one)."""
    s = _slices(bounds)
    first, second, last = s[0], s[1], s[-1]

    def mid(sl):
        return (sl[0] + sl[1]) // 2

    x = torch.randn(1, T, V) * 3
    t = torch.randint(0, V, (1, T))
    x[0, 1, mid(second)] = NAN  # NaN on one slice: NaN on every rank
    x[0, 2, mid(last)] = INF  # +inf on one slice, the target elsewhere
    t[0, 2] = first[0]
    t[0, 3] = mid(second)  # +inf at the target
    x[0, 3, t[0, 3]] = INF
    x[0, 4, first[0] : first[1]] = -INF  # a slice all -inf, the others finite
    t[0, 4] = mid(last)
    x[0, 5, first[0] : first[1]] = -INF  # the target on that slice
    t[0, 5] = first[0] + 1
    x[0, 6] = -INF  # every slice -inf
    t[0, 7] = -100  # ignored, whatever it holds
    x[0, 7] = NAN
    x[0, 8, first[0] + 3] = x[0, 8, last[0] + 2] = 20.0  # a tie for the maximum across slices
    x[0, 8, second[0]] = x[0, 8, last[0] + 5] = 15.0  # and one inside the top 5
    t[0, 9] = mid(last)  # -inf at the target
    x[0, 9, t[0, 9]] = -INF
    x[0, 10] = -1.0  # tied maxima at the top of float32, on two slices
    x[0, 10, first[0]] = x[0, 10, last[1] - 1] = 3e38
    t[0, 10] = last[1] - 1
    x[0, 11, first[0] + 7], x[0, 11, last[0] + 7] = 1e4, -1e4
    t[0, 11] = second[0]
    x[0, 12, ::2] = -3e38  # every other logit -3e38
    y = torch.randn(1, T, V) * 3
    y[0, 13, mid(second)] = -INF  # q = 0 where p > 0: KL(p||q) = +inf
    y[0, 14, first[0] : first[1]] = -INF  # q is 0 on a whole slice
    x[0, 15, last[0] : last[1]] = -INF  # p is 0 on a whole slice: KL(q||p) = +inf
    return x, y, t


def hidden_inputs(case, bounds):
    """(hidden (1, T, D), weight (V, D), bias (V,), targets (1, T), test weight (V, D))."""
    s = _slices(bounds)
    first, last = s[0], s[-1]
    hidden = torch.randn(1, T, D)
    weight = torch.randn(V, D) * (2.0 / D ** 0.5)
    bias = torch.randn(V)
    t = torch.randint(0, V, (1, T))
    t[0, 6] = -100
    if case == "slice_ninf":  # the first slice all -inf for every row; some targets on it
        bias[first[0] : first[1]] = -INF
        t[0, 1:4] = first[0] + 2
    elif case == "nan_row":
        hidden[0, 3, 5] = NAN
        hidden[0, 6] = NAN  # ignored
    elif case == "pinf_col":  # +inf on one column of the last slice; row 2's target there
        bias[last[0] + 1] = INF
        t[0, 2] = last[0] + 1
    elif case == "ties":  # two equal output rows on two slices, above every other logit
        weight[last[0] + 4] = weight[first[0] + 9]
        bias[first[0] + 9] = bias[last[0] + 4] = 40.0
    test = weight * 0.8 + torch.randn(V, D) * 0.1
    return hidden, weight, bias, t, test


# ---- checks --------------------------------------------------------------------------------------

def _shifted(x, t, shift):
    return (x[..., :-1, :], t[..., 1:]) if shift else (x, t)


def check_float(name, got, want, logits, opts):
    from helpers import assert_nll_close, extreme_scale

    want = want.float().double()
    scale = extreme_scale(logits, want, softcap=opts.get("softcap"),
                          temperature=opts.get("temperature", 1.0))
    assert_nll_close(got, want, scale, what=name)


def check_argmax(name, got, want, z, scored):
    """The reference's id, except where another id holds a value within one float32 ulp (the
    kernels transform in float32); an exact tie must give the reference's (lowest) id."""
    z = z.reshape(-1, z.shape[-1]).double()
    got, want, scored = got.reshape(-1), want.reshape(-1), scored.reshape(-1)
    assert bool((got[~scored] == -1).all()), f"{name}: ignored rows not -1"
    for r in scored.nonzero().flatten().tolist():
        if torch.isnan(z[r]).any():
            assert 0 <= int(got[r]) < z.shape[1], f"{name}: NaN row {r}: id {int(got[r])}"
            continue
        a, b = int(got[r]), int(want[r])
        if a == b:
            continue
        za, zb = z[r, a], z[r, b]
        band = 4 * torch.finfo(torch.float32).eps * max(abs(float(zb)), 1e-30)
        assert za != zb and abs(float(za - zb)) <= band, (
            f"{name}: row {r}: id {a} (value {float(za)!r}), reference {b} ({float(zb)!r})")


def check_rank(name, got, z, t, scored):
    z = z.reshape(-1, z.shape[-1]).double()
    got, t, scored = got.reshape(-1), t.reshape(-1), scored.reshape(-1)
    for r in scored.nonzero().flatten().tolist():
        if torch.isnan(z[r]).any():
            assert 0 <= int(got[r]) <= z.shape[1], f"{name}: NaN row {r}: rank {int(got[r])}"
            continue
        zt = z[r, int(t[r])]
        band = 4 * torch.finfo(torch.float32).eps * abs(float(zt))
        lo, hi = int((z[r] > zt + band).sum()), int((z[r] > zt - band).sum())
        assert lo <= int(got[r]) <= hi, f"{name}: row {r}: rank {int(got[r])} not in [{lo}, {hi}]"


def _y64(z, opts):
    cap = opts.get("softcap")
    return z if cap is None else cap * torch.tanh(z / cap)


def check_stats(got, want, logits, t, opts, top_k):
    logits, t = _shifted(logits, t, opts.get("shift", False))
    scored = t != -100
    for f in ("nll", "entropy", "max_logprob"):
        check_float(f, getattr(got, f), getattr(want, f), logits, opts)
    y = _y64(logits.double(), opts)
    check_argmax("argmax", got.argmax, want.argmax, y, scored)
    check_rank("rank", got.rank, y, t, scored)
    if not top_k:
        assert got.top_k_ids is None and got.top_k_logprobs is None
        return
    check_float("top_k_logprobs", got.top_k_logprobs, want.top_k_logprobs, logits, opts)
    ids = got.top_k_ids.reshape(-1, top_k)
    flat_y = y.reshape(-1, y.shape[-1])
    m = flat_y.amax(-1, keepdim=True)
    d = (flat_y - torch.where(torch.isfinite(m), m, 0.0)) / opts.get("temperature", 1.0)
    logp = d - d.logsumexp(-1, keepdim=True)
    ok = scored.reshape(-1) & ~torch.isnan(flat_y).any(-1)
    assert bool((ids[~scored.reshape(-1)] == -1).all())
    for r in ok.nonzero().flatten().tolist():
        assert len(set(ids[r].tolist())) == top_k and bool((ids[r] >= 0).all()), ids[r]
    at = torch.where(ok.unsqueeze(-1), logp.gather(-1, ids.clamp(0)), 0.0).reshape(
        got.top_k_logprobs.shape)
    check_float("top_k_logprobs at their ids", torch.where(
        ok.reshape(t.shape).unsqueeze(-1), got.top_k_logprobs, 0.0), at, logits, opts)


def check_compare(got, want, base, test, t, opts):
    base, t2 = _shifted(base, t, opts.get("shift", False))
    test, _ = _shifted(test, t, opts.get("shift", False))
    scored = t2 != -100
    for f, logits in (("kl", base), ("kl_reverse", test), ("nll_base", base),
                      ("nll_test", test)):
        check_float(f, getattr(got, f), want[f], logits, opts)
    check_argmax("argmax_base", got.argmax_base, want["argmax_base"], base, scored)
    check_argmax("argmax_test", got.argmax_test, want["argmax_test"], test, scored)


# ---- the op cases --------------------------------------------------------------------------------

class Ctx:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def shard(self, layout):
        import pplfast

        bounds, sized = layouts(self.world)[layout]
        start, stop = bounds[self.rank]
        return bounds, pplfast.VocabShard(start, stop, vocab_size=V if sized else None)


def _on(backend, fn):
    """``fn`` run with its tensors where the backend runs (a GPU for triton where there is one:
    the exchange then goes through the CPU, as gloo needs) and its result brought back."""
    from helpers import _to, backend_device

    device = backend_device(backend)

    def call(*args, **kwargs):
        return _to(fn(*_to(args, device), **_to(kwargs, device)), "cpu")
    return call


def run_logits_case(ctx, op, layout, opt, backend):
    import pplfast
    from pplfast import reference

    bounds, shard = ctx.shard(layout)
    x, y, t = special_logits(bounds)
    opts = dict(OPTIONS[opt])
    if opts.get("shift"):  # the same rows: row r reads position r and predicts targets[r + 1]
        x = torch.cat([x, torch.randn(1, 1, V)], 1)
        y = torch.cat([y, torch.randn(1, 1, V)], 1)
        t = torch.cat([torch.randint(0, V, (1, 1)), t], 1)
    local = slice(shard.start, shard.stop)
    kw = dict(opts, vocab_shard=shard, backend=backend)
    if op == "token_nll":
        got = _on(backend, pplfast.token_nll)(x[..., local], t, **kw)
        check_float("nll", got, reference.token_nll(x, t, **opts), *_shifted(x, t, opts.get(
            "shift", False))[:1], opts)
    elif op == "perplexity":
        got = _on(backend, pplfast.perplexity)(x[..., local], t, **kw)
        nll = reference.token_nll(x, t, **opts)
        scored = _shifted(x, t, opts.get("shift", False))[1] != -100
        want = torch.exp(nll[scored].sum() / scored.sum())
        assert torch.equal(got.isnan(), want.isnan()) and (
            got.isnan() or got.double() == want.float().double() or
            abs(float(got) - float(want)) <= 1e-5 * abs(float(want))), (float(got), float(want))
    elif op.startswith("token_stats"):
        k = 5 if op.endswith("top5") else 0
        got = _on(backend, pplfast.token_stats)(x[..., local], t, top_k=k, **kw)
        check_stats(got, reference.token_stats(x, t, top_k=k, **opts), x, t, opts, k)
    elif op == "compare":
        got = _on(backend, pplfast.compare)(x[..., local], y[..., local], t, **kw)
        check_compare(got, reference.compare(x, y, t, **opts), x, y, t, opts)


def run_linear_case(ctx, op, layout, hidden_case, backend):
    import pplfast
    from pplfast import reference

    bounds, shard = ctx.shard(layout)
    h, w, b, t, w_test = hidden_inputs(hidden_case, bounds)
    opts = list(OPTIONS.values())[HIDDEN_CASES.index(hidden_case) % len(OPTIONS)]
    local = slice(shard.start, shard.stop)
    kw = dict(opts, vocab_shard=shard, backend=backend)
    z = torch.nn.functional.linear(h.double(), w.double(), b.double())
    if op == "linear_token_nll":
        got = _on(backend, pplfast.linear_token_nll)(h, w[local], t, bias=b[local], **kw)
        want = reference.linear_token_nll(h, w, t, bias=b, **opts)
        check_float("nll", got, want, _shifted(z, t, opts.get("shift", False))[0], opts)
    elif op == "linear_token_stats_top3":
        got = _on(backend, pplfast.linear_token_stats)(h, w[local], t, bias=b[local], top_k=3,
                                                       **kw)
        want = reference.linear_token_stats(h, w, t, bias=b, top_k=3, **opts)
        check_stats(got, want, z, t, opts, 3)
    elif op == "linear_compare":
        h2 = h * 0.9
        got = _on(backend, pplfast.linear_compare)(h, w[local], h2, w_test[local], t,
                                                   bias_base=b[local], bias_test=b[local], **kw)
        want = reference.linear_compare(h, w, h2, w_test, t, bias_base=b, bias_test=b, **opts)
        z2 = torch.nn.functional.linear(h2.double(), w_test.double(), b.double())
        check_compare(got, want, z, z2, t, opts)


def run_case(ctx, name):
    if name in EXTRA:
        return EXTRA[name][0](ctx)
    op, layout, variant, backend = name.split("/")
    if op in LINEAR_OPS:
        return run_linear_case(ctx, op, layout, variant, backend)
    return run_logits_case(ctx, op, layout, variant, backend)


# ---- other cases: collectives, errors, DTensor, compile, memory, metrics ------------------------

EXTRA = {}


def extra(*worlds):
    def register(fn):
        EXTRA[fn.__name__] = (fn, worlds)
        return fn
    return register


@contextlib.contextmanager
def spy_collectives():
    """Every torch.distributed collective called, with the bytes of its input tensor."""
    calls = []
    names = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
             "broadcast", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather",
             "scatter", "reduce", "all_to_all_single", "all_gather_object", "broadcast_object_list")
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(n, fn):
        def spy(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            sent = tensors[1] if n in ("all_gather_single", "all_gather_into_tensor") else (
                tensors[0] if tensors else None)
            calls.append((n, 0 if sent is None else sent.numel() * sent.element_size()))
            return fn(*args, **kwargs)
        return spy

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


@extra(2, 3)
def collectives_per_call(ctx):
    """One collective per call (two for the statistics), and the bytes each rank sends per row:
    12 for the NLL (the header's 16 bytes once per call)."""
    import pplfast

    bounds, shard = ctx.shard("from_vocab")
    x, y, t = special_logits(bounds)
    h, w, b, _, _ = hidden_inputs("plain", bounds)
    local = slice(shard.start, shard.stop)
    rows = t.numel()
    cases = [
        ("token_nll", 1, 12, lambda k: pplfast.token_nll(x[..., local], t, **k)),
        ("perplexity", 1, 12, lambda k: pplfast.perplexity(x[..., local], t, **k)),
        ("linear_token_nll", 1, 12, lambda k: pplfast.linear_token_nll(
            h, w[local], t, bias=b[local], **k)),
        ("compare", 1, 48, lambda k: pplfast.compare(x[..., local], y[..., local], t, **k)),
        ("linear_compare", 1, 48, lambda k: pplfast.linear_compare(
            h, w[local], h, w[local], t, **k)),
        ("token_stats", 2, 24, lambda k: pplfast.token_stats(x[..., local], t, **k)),
        ("token_stats top_k=4", 2, 24 + 32, lambda k: pplfast.token_stats(
            x[..., local], t, top_k=4, **k)),
        ("linear_token_stats", 2, 24, lambda k: pplfast.linear_token_stats(
            h, w[local], t, **k)),
    ]
    header = 4 * HEADER_WORDS
    for backend in BACKENDS:
        for what, count, per_row, call in cases:
            with spy_collectives() as calls:
                call(dict(vocab_shard=shard, backend=backend))
            assert len(calls) == count, f"{what} [{backend}]: {len(calls)} collectives {calls}"
            sent = sum(size for _, size in calls) - header * count
            assert sent == per_row * rows, f"{what} [{backend}]: {sent} bytes for {rows} rows"
    from pplfast._vocab_merge import bytes_per_row

    assert bytes_per_row("token_nll") == 12 <= 64 and bytes_per_row("compare") == 48
    assert bytes_per_row("token_stats") == 24 and bytes_per_row("token_stats", 4) == 56


def _raises(exc_type, text, fn):
    try:
        fn()
    except exc_type as exc:
        assert text in str(exc), f"{exc_type.__name__} without {text!r}: {exc}"
        assert "\n" not in str(exc).strip(), f"not one line: {exc}"
        return
    raise AssertionError(f"no {exc_type.__name__} ({text!r})")


@extra(2, 3)
def bad_layouts_and_inputs(ctx):
    """The same one-line error on every rank, and the group still works afterwards."""
    import pplfast

    x, _, t = special_logits(layouts(ctx.world)["from_vocab"][0])
    step = -(-V // ctx.world)
    lo, hi = ctx.rank * step, min(V, ctx.rank * step + step)
    # overlapping slices (every rank one entry too wide but the last)
    wide = min(V, hi + 1)
    _raises(ValueError, "overlap", lambda: pplfast.token_nll(
        x[..., lo:wide], t, vocab_shard=pplfast.VocabShard(lo, wide)))
    # a gap
    narrow = hi - 1 if ctx.rank == 0 else hi
    _raises(ValueError, "uncovered", lambda: pplfast.token_nll(
        x[..., lo:narrow], t, vocab_shard=pplfast.VocabShard(lo, narrow)))
    shard = pplfast.VocabShard(lo, hi)
    # targets that differ between ranks
    t2 = t.clone()
    t2[0, 0] = (int(t[0, 0]) + 1 + ctx.rank) % V
    _raises(ValueError, "targets differ", lambda: pplfast.token_nll(x[..., lo:hi], t2,
                                                                    vocab_shard=shard))
    # a target past V, found after the exchange (no vocab_size), on every rank
    t3 = t.clone()
    t3[0, 5] = V
    _raises(ValueError, f"targets[0, 5] = {V} is outside [0, {V})",
            lambda: pplfast.token_nll(x[..., lo:hi], t3, vocab_shard=shard))
    # ... and before any kernel with vocab_size
    sized = pplfast.VocabShard.from_vocab(V)
    _raises(ValueError, f"is outside [0, {V})",
            lambda: pplfast.token_nll(x[..., sized.start:sized.stop], t3, vocab_shard=sized))
    # wrong local width, before any collective
    _raises(ValueError, "vocab_shard is", lambda: pplfast.token_nll(
        x[..., lo : hi - 1], t, vocab_shard=shard))
    # a vocab_size the slices do not add up to (named by some ranks only)
    below = t.clamp(max=999)
    _raises(ValueError, "vocab_size is 1000", lambda: pplfast.token_nll(
        x[..., lo:hi], below, vocab_shard=pplfast.VocabShard(lo, hi, vocab_size=1000)
        if hi <= 1000 else pplfast.VocabShard(lo, hi)))
    _raises(ValueError, "start <= stop", lambda: pplfast.VocabShard(5, 3))
    _raises(TypeError, "vocab_shard must be a pplfast.VocabShard",
            lambda: pplfast.token_nll(x, t, vocab_shard=(0, V)))
    _raises(ValueError, "top_k must be", lambda: pplfast.token_stats(
        x[..., lo:hi], t, top_k=65, vocab_shard=shard))
    got = pplfast.token_nll(x[..., lo:hi], t, vocab_shard=shard)  # the group still works
    from pplfast import reference

    check_float("nll after errors", got, reference.token_nll(x, t), x, {})


@extra(2, 3)
def dtensor_inputs(ctx):
    """DTensors sharded on the vocabulary need no vocab_shard: the group comes from the mesh."""
    import pplfast
    from pplfast import reference
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (ctx.world,))
    bounds = layouts(ctx.world)["from_vocab"][0]
    x, y, t = special_logits(bounds)
    dx = distribute_tensor(x, mesh, [Shard(-1)])
    dy = distribute_tensor(y, mesh, [Shard(2)])
    dt = distribute_tensor(t, mesh, [Replicate()])
    check_float("nll", pplfast.token_nll(dx, dt), reference.token_nll(x, t), x, {})
    check_float("nll (plain targets)", pplfast.token_nll(dx, t, temperature=0.5),
                reference.token_nll(x, t, temperature=0.5), x, dict(temperature=0.5))
    check_stats(pplfast.token_stats(dx, t, top_k=2), reference.token_stats(x, t, top_k=2), x, t,
                {}, 2)
    check_compare(pplfast.compare(dx, dy, t), reference.compare(x, y, t), x, y, t, {})
    h, w, b, ht, _ = hidden_inputs("plain", bounds)
    dw, db = distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)])
    check_float("linear nll", pplfast.linear_token_nll(h, dw, ht, bias=db),
                reference.linear_token_nll(h, w, ht, bias=b),
                torch.nn.functional.linear(h.double(), w.double(), b.double()), {})
    perplexity = pplfast.perplexity(dx, dt)
    assert abs(float(perplexity) - float(torch.exp(reference.token_nll(x, t)[t != -100].mean()))
               ) <= 1e-5 * float(perplexity) or torch.isnan(perplexity)
    _raises(ValueError, "pass vocab_shard=None", lambda: pplfast.token_nll(
        dx, t, vocab_shard=pplfast.VocabShard.from_vocab(V)))
    from torch.distributed.tensor import DTensor

    partial = DTensor.from_local(x[..., :3], mesh, [Partial()])
    _raises(ValueError, "Partial", lambda: pplfast.token_nll(partial, t))
    replicated = distribute_tensor(x, mesh, [Replicate()])  # not split: scored whole, locally
    check_float("replicated", pplfast.token_nll(replicated, t), reference.token_nll(x, t), x, {})


@extra(2)
def compiles_with_vocab_shard(ctx):
    """An eval step with vocab_shard compiles with fullgraph=True (the op is one graph node; its
    exchange runs inside it)."""
    import pplfast
    from pplfast import reference

    bounds, shard = ctx.shard("from_vocab")
    x, _, t = special_logits(bounds)
    local = x[..., shard.start : shard.stop].contiguous()

    def step(logits, targets):
        return pplfast.token_nll(logits, targets, vocab_shard=shard)

    got = torch.compile(step, fullgraph=True, backend="eager")(local, t)
    check_float("compiled nll", got, reference.token_nll(x, t), x, {})


@extra(2)
def no_fp32_copy_of_the_slice(ctx):
    """The cpu backend's vocab-parallel ops allocate nothing of the slice's size in float32: the
    peak grows by less than a quarter of a float32 copy of the local logits (bf16, 32 x 65536);
    a float32 copy (the live control) grows it by the full size."""
    import pplfast
    from pplfast._memprobe import reset_peak, status_bytes

    rows, width = 32, 65536
    shard = pplfast.VocabShard(ctx.rank * width, (ctx.rank + 1) * width, vocab_size=2 * width)
    x = torch.randn(1, rows, width).to(torch.bfloat16)
    y = torch.randn(1, rows, width).to(torch.bfloat16)
    t = torch.randint(0, 2 * width, (1, rows))
    copy_bytes = rows * width * 4
    calls = {
        "token_nll": lambda: pplfast.token_nll(x, t, vocab_shard=shard, backend="cpu"),
        "token_stats": lambda: pplfast.token_stats(x, t, top_k=8, vocab_shard=shard,
                                                   backend="cpu"),
        "compare": lambda: pplfast.compare(x, y, t, vocab_shard=shard, backend="cpu"),
        "control: x.float()": lambda: x.float(),
    }
    for what, call in calls.items():
        call()  # warm: first-call allocations (thread pools, code) are not the op's
        dist.barrier()
        assert reset_peak(), "cannot reset VmHWM"
        before = status_bytes("VmHWM")
        out = call()
        grown = status_bytes("VmHWM") - before
        del out
        if what.startswith("control"):
            assert grown >= copy_bytes * 0.9, f"the control grew the peak by {grown} bytes only"
        else:
            assert grown < copy_bytes / 4, f"{what}: the peak grew by {grown} bytes " \
                                           f"(a float32 copy of the slice is {copy_bytes})"


@extra(2)
def metric_counts_each_row_once(ctx):
    """Tensor parallel over the 2 ranks (one data-parallel replica): sync() over the world
    counts each row once; so does sync over a group of one rank per vocabulary group."""
    _metric_case(ctx, tp=2)


@extra(2)
def metric_data_parallel_only(ctx):
    """Data parallel over the 2 ranks, each rank its own vocabulary group of one."""
    _metric_case(ctx, tp=1)


@extra(4)
def metric_tp2_dp2(ctx):
    """2 replicas x 2 vocabulary slices: sync() and sync(dp_group) give the single-process
    figures over both replicas' rows."""
    _metric_case(ctx, tp=2)


def _metric_case(ctx, tp):
    import pplfast
    from torch.distributed.device_mesh import init_device_mesh

    dp = ctx.world // tp
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    tp_group, dp_group = mesh.get_group("tp"), mesh.get_group("dp")
    replica = mesh.get_local_rank("dp")
    shard = pplfast.VocabShard.from_vocab(V, group=tp_group)
    local = slice(shard.start, shard.stop)
    batches = []
    for r in range(dp):
        g = torch.Generator().manual_seed(100 + r)
        x = torch.randn(2, 9, V, generator=g) * 2
        y = x + torch.randn(2, 9, V, generator=g) * 0.5
        t = torch.randint(0, V, (2, 9), generator=g)
        t[0, 3] = -100
        batches.append((x, y, t))
    single_ppl, single_cmp = pplfast.Perplexity(), pplfast.Comparison()
    for x, y, t in batches:
        single_ppl.update(x, t, shift=True, stats=True)
        single_cmp.update(x, y, t, shift=True)
    want_ppl, want_cmp = single_ppl.compute(), single_cmp.compute()
    x, y, t = batches[replica]
    for group in (None, dp_group):
        ppl, cmp_ = pplfast.Perplexity(), pplfast.Comparison()
        ppl.update(x[..., local], t, shift=True, stats=True, vocab_shard=shard)
        cmp_.update(x[..., local], y[..., local], t, shift=True, vocab_shard=shard)
        got_ppl, got_cmp = ppl.sync(group).compute(), cmp_.sync(group).compute()
        where = "world" if group is None else "dp group"
        assert got_ppl.num_tokens == want_ppl.num_tokens, (where, got_ppl.num_tokens,
                                                           want_ppl.num_tokens)
        assert got_cmp.num_tokens == want_cmp.num_tokens, (where, got_cmp.num_tokens)
        for name in ("perplexity", "mean_nll_stderr", "mean_entropy", "top1_accuracy"):
            a, b = getattr(got_ppl, name), getattr(want_ppl, name)
            assert abs(a - b) <= 1e-5 * abs(b), (where, name, a, b)
        for name in ("kl_mean", "kl_max", "top1_agreement", "delta_p_rms", "ppl_ratio"):
            a, b = getattr(got_cmp, name), getattr(want_cmp, name)
            assert abs(a - b) <= 1e-5 * abs(b) + 1e-7, (where, name, a, b)
        assert got_cmp.kl_percentiles.keys() == want_cmp.kl_percentiles.keys()
        for p, value in want_cmp.kl_percentiles.items():
            assert abs(got_cmp.kl_percentiles[p] - value) <= 1e-5 * abs(value) + 1e-7, p


# ---- the process side ---------------------------------------------------------------------------

def _rank(rank, world, out, port, names):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    ctx = Ctx(rank, world)
    results = {}
    for name in names:
        torch.manual_seed(zlib.crc32(name.encode()))
        try:
            run_case(ctx, name)
            results[name] = None
        except Exception:  # the case's message, for the test of that case
            results[name] = f"rank {rank}: " + traceback.format_exc(limit=-4)[-3000:]
        with open(f"{out}.rank{rank}.json", "w") as f:  # so far: a hang shows where
            json.dump(results, f)
        dist.barrier()
    dist.destroy_process_group()


def main(world: int, out: str, port: int, names=None) -> None:
    names = case_names(world) if not names else names
    torch.multiprocessing.spawn(_rank, args=(world, out, port, names), nprocs=world)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:])
