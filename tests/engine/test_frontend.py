"""The front door (pplfast._frontend) and the custom ops behind it (pplfast._ops), for all six
ops: each op passes torch.library.opcheck, every public op and the metrics' updates compile
with torch.compile(fullgraph=True) (eager and inductor) and give the eager numbers, shift=True
copies neither logits nor hidden states, and host syncs stay at one per call at most."""
from __future__ import annotations

import pytest
import torch

import pplfast
from pplfast import _cpu, reference

V, D = 37, 12


def _case(B=2, T=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen)
    hidden_t = hidden + 0.1 * torch.randn(B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / D**0.5
    weight_t = weight + 0.05 * torch.randn(V, D, generator=gen)
    bias = torch.randn(V, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, 2] = -100
    return hidden, hidden_t, weight, weight_t, bias, targets


def _public_calls():
    """``name -> (function, args, kwargs)`` of every public op on one case (shift, softcap,
    temperature, a bias and an ignored target)."""
    hidden, hidden_t, weight, weight_t, bias, targets = _case()
    logits, logits_t = hidden @ weight.T + bias, hidden_t @ weight_t.T
    opts = dict(shift=True, softcap=6.0, temperature=0.8, backend="cpu")
    return {
        "token_nll": (pplfast.token_nll, (logits, targets), opts),
        "perplexity": (pplfast.perplexity, (logits, targets), opts),
        "token_stats": (pplfast.token_stats, (logits, targets), dict(top_k=3, **opts)),
        "compare": (pplfast.compare, (logits, logits_t, targets), opts),
        "linear_token_nll": (pplfast.linear_token_nll, (hidden, weight, targets),
                             dict(bias=bias, **opts)),
        "linear_perplexity": (pplfast.linear_perplexity, (hidden, weight, targets),
                              dict(bias=bias, **opts)),
        "linear_token_stats": (pplfast.linear_token_stats, (hidden, weight, targets),
                               dict(bias=bias, top_k=3, **opts)),
        "linear_compare": (pplfast.linear_compare, (hidden, weight, hidden_t, weight_t, targets),
                           dict(bias_base=bias, **opts)),
    }


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [getattr(result, f) for f in result.__dataclass_fields__
            if isinstance(getattr(result, f), torch.Tensor)]


# ---- torch.library.opcheck -----------------------------------------------------------------

def _op_args():
    hidden, hidden_t, weight, weight_t, bias, targets = _case(B=1, T=6)
    h2, ht2 = hidden.reshape(-1, D), hidden_t.reshape(-1, D)
    logits3, logits3_t = (h2 @ weight.T).unsqueeze(0), (ht2 @ weight_t.T).unsqueeze(0)
    t = targets.reshape(-1)
    common = (-100, 5.0, 0.9)
    ops = torch.ops.pplfast
    return {
        "token_nll": (ops.token_nll, (logits3, t, *common, "cpu", True)),
        "linear_token_nll": (ops.linear_token_nll, (h2, weight, bias, t, *common, "cpu", True)),
        "token_stats": (ops.token_stats, (logits3, t, *common, 4, "cpu", True)),
        "token_stats-top0": (ops.token_stats, (logits3, t, *common, 0, "cpu", False)),
        "linear_token_stats": (ops.linear_token_stats,
                               (h2, weight, bias, t, *common, 4, "cpu", True)),
        "compare": (ops.compare, (logits3, logits3_t, t, *common, "cpu", True)),
        "linear_compare": (ops.linear_compare,
                           (h2, weight, bias, ht2, weight_t, None, t, *common, "cpu", True)),
        "perplexity_sums": (ops.perplexity_sums, (h2[:, 0], t != -100, h2[:, 1], t, t.flip(0))),
        "perplexity_sums-nostats": (ops.perplexity_sums, (h2[:, 0], t != -100, None, None, None)),
        "comparison_sums": (ops.comparison_sums,
                            (h2[:, 0].abs(), h2[:, 1].abs(), h2[:, 2].abs(), t, t.flip(0),
                             t != -100)),
    }


@pytest.mark.parametrize("name", sorted(_op_args()))
def test_custom_op_passes_opcheck(name, real_empty):
    op, args = _op_args()[name]
    torch.library.opcheck(op, args)


# ---- torch.compile(fullgraph=True) ---------------------------------------------------------

def _assert_same(got, want):
    for g, w in zip(_tensors(got), _tensors(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("name", sorted(_public_calls()))
def test_public_op_compiles_fullgraph(name, compiler, real_empty):
    fn, args, kwargs = _public_calls()[name]
    want = fn(*args, **kwargs)
    got = torch.compile(lambda *a: fn(*a, **kwargs), fullgraph=True, backend=compiler)(*args)
    _assert_same(got, want)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_metric_updates_compile_fullgraph(compiler, real_empty):
    hidden, hidden_t, weight, weight_t, bias, targets = _case()
    logits, logits_t = hidden @ weight.T, hidden_t @ weight_t.T

    def step(ppl, cmp, a, b, t):
        ppl.update(a, t, shift=True, stats=True, backend="cpu")
        cmp.update(a, b, t, shift=True, backend="cpu")

    eager = (pplfast.Perplexity(), pplfast.Comparison())
    compiled = (pplfast.Perplexity(), pplfast.Comparison())
    step(*eager, logits, logits_t, targets)
    torch.compile(step, fullgraph=True, backend=compiler)(*compiled, logits, logits_t, targets)
    for e, c in zip(eager, compiled):
        assert c.num_tokens == e.num_tokens == int((targets[:, 1:] != -100).sum())
        assert c.compute() == e.compute()


def test_metric_updates_leave_no_reduction_to_the_compiler():
    """The updates' float64 sums (and compare's exp of Δp) are custom ops in the traced graph:
    a compiler that regenerated them would reorder the sums and use its own exp, and the
    compiled figures would differ from the eager ones in the last bit on some machines."""
    hidden, hidden_t, weight, weight_t, bias, targets = _case()
    logits, logits_t = hidden @ weight.T, hidden_t @ weight_t.T
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def step(ppl, cmp, a, b, t):
        ppl.update(a, t, shift=True, stats=True, backend="cpu")
        cmp.update(a, b, t, shift=True, backend="cpu")

    torch.compile(step, fullgraph=True, backend=capture)(
        pplfast.Perplexity(), pplfast.Comparison(), logits, logits_t, targets)
    targets_called = [str(node.target) for gm in graphs for node in gm.graph.nodes
                      if node.op in ("call_function", "call_method")]
    assert "pplfast.perplexity_sums.default" in targets_called
    assert "pplfast.comparison_sums.default" in targets_called
    assert not [t for t in targets_called if "exp" in t or t.endswith("sum")], targets_called


# ---- no copy under shift=True --------------------------------------------------------------

_LAUNCHERS = {  # op -> (launcher name in the backend module, positions of the data tensors)
    "token_nll": ("token_nll", (0,)),
    "token_stats": ("token_stats", (0,)),
    "compare": ("compare", (0, 1)),
    "linear_token_nll": ("linear_token_nll", (0,)),
    "linear_token_stats": ("linear_token_stats", (0,)),
    "linear_compare": ("linear_compare", (0, 3)),
}


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("op", sorted(_LAUNCHERS))
def test_shift_copies_neither_logits_nor_hidden_states(op, B, monkeypatch):
    launcher, positions = _LAUNCHERS[op]
    seen = []
    original = getattr(_cpu, launcher)

    def spy(*args, **kwargs):
        seen.append([args[i].untyped_storage().data_ptr() for i in positions])
        return original(*args, **kwargs)

    monkeypatch.setattr(_cpu, launcher, spy)
    hidden, hidden_t, weight, weight_t, bias, targets = _case(B=B, T=9)
    if op.startswith("linear_"):
        inputs = (hidden, hidden_t) if op == "linear_compare" else (hidden,)
        args = ((hidden, weight, hidden_t, weight_t, targets) if op == "linear_compare"
                else (hidden, weight, targets))
    else:
        inputs = (hidden @ weight.T, hidden_t @ weight_t.T)[: len(positions)]
        args = (*inputs, targets)
    result = getattr(pplfast, op)(*args, shift=True, backend="cpu")
    assert seen == [[x.untyped_storage().data_ptr() for x in inputs]]
    want = getattr(reference, op)(*args, shift=True)
    want = want if isinstance(want, dict) else {"nll": want} if isinstance(want, torch.Tensor) \
        else {f: getattr(want, f) for f in ("nll", "entropy", "argmax")}
    for field, w in want.items():
        got = result if isinstance(result, torch.Tensor) else getattr(result, field)
        assert got.shape == (B, 8) and got.is_contiguous()
        if got.is_floating_point():
            torch.testing.assert_close(got.double(), w, rtol=0, atol=5e-5)
        else:
            assert torch.equal(got, w)
    assert (result if isinstance(result, torch.Tensor) else _tensors(result)[0])[0, 1] == 0


# ---- host syncs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["token_nll", "token_stats", "compare", "linear_token_nll",
                                  "linear_token_stats", "linear_compare"])
def test_one_host_sync_per_call(name, host_reads):
    # logits ops: one read for the range check, none without it; hidden-states ops: the range
    # check and the count of scored rows (which sizes their gather) share one read
    fn, args, kwargs = _public_calls()[name]
    kwargs = dict(kwargs, backend="cpu")
    checked = fn(*args, **kwargs)
    assert len(host_reads) == 1, host_reads
    host_reads.clear()
    unchecked = fn(*args, check_targets=False, **kwargs)
    assert len(host_reads) == (1 if name.startswith("linear_") else 0), host_reads
    _assert_same(unchecked, checked)
