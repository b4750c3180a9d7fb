"""Public API contract: shapes, dtypes, dispatch, and every bad input of docs/ops.md's
"Bad input"."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import pplfast
from pplfast import reference

from helpers import ALL_BACKENDS, backend_device


def logits_targets(N=4, V=10, dtype=torch.float32):
    return torch.randn(N, V, dtype=dtype), torch.randint(0, V, (N,))


def test_reference_equals_cross_entropy_in_float64():
    logits = torch.randn(3, 7, 101)
    targets = torch.randint(0, 101, (3, 7))
    targets[0, 0] = -100
    want = F.cross_entropy(logits.double().reshape(-1, 101), targets.reshape(-1), reduction="none")
    got = reference.token_nll(logits, targets)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.reshape(-1), want, rtol=0, atol=1e-12)
    capped = 4.0 * torch.tanh(logits.double() / 4.0) / 0.5
    want = F.cross_entropy(capped.reshape(-1, 101), targets.reshape(-1), reduction="none")
    got = reference.token_nll(logits, targets, softcap=4.0, temperature=0.5)
    torch.testing.assert_close(got.reshape(-1), want, rtol=0, atol=1e-12)


def test_reference_linear_equals_linear_then_cross_entropy():
    hidden, weight, bias = torch.randn(5, 6, 12), torch.randn(33, 12), torch.randn(33)
    targets = torch.randint(0, 33, (5, 6))
    z = F.linear(hidden.double(), weight.double(), bias.double())
    want = F.cross_entropy(z[:, :-1].reshape(-1, 33), targets[:, 1:].reshape(-1), reduction="none")
    got = reference.linear_token_nll(hidden, weight, targets, bias=bias, shift=True)
    torch.testing.assert_close(got.reshape(-1), want, rtol=0, atol=1e-12)


def test_output_dtype_and_shape():
    logits, targets = logits_targets(dtype=torch.bfloat16)
    out = pplfast.token_nll(logits, targets)
    assert out.dtype == torch.float32 and out.shape == (4,)
    ppl = pplfast.perplexity(logits, targets)
    assert ppl.dtype == torch.float32 and ppl.shape == ()
    hidden, weight = torch.randn(2, 5, 8), torch.randn(20, 8)
    out = pplfast.linear_token_nll(hidden, weight, torch.randint(0, 20, (2, 5)), shift=True)
    assert out.dtype == torch.float32 and out.shape == (2, 4)


def test_reference_backend_is_float32_of_the_oracle():
    logits, targets = logits_targets(V=99)
    got = pplfast.token_nll(logits, targets, backend="reference")
    assert torch.equal(got, reference.token_nll(logits, targets).float())


def test_options_are_keyword_only():
    logits, targets = logits_targets()
    with pytest.raises(TypeError):
        pplfast.token_nll(logits, targets, -100)  # noqa


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"logits": torch.randint(0, 5, (4, 10))}, TypeError, "logits must be float32"),
        ({"logits": torch.randn(4, 10, dtype=torch.float64)}, TypeError, "logits is float64"),
        ({"logits": [[0.0] * 10] * 4}, TypeError, "logits must be a torch.Tensor"),
        ({"logits": torch.tensor(1.0)}, ValueError, "at least one dimension"),
        ({"targets": torch.zeros(4)}, TypeError, "targets must be int64 or int32, got torch.float32"),
        ({"targets": torch.zeros(4, dtype=torch.int16)}, TypeError, "torch.int16"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, ValueError, r"targets has shape \(5,\)"),
        ({"targets": torch.zeros(4, 1, dtype=torch.long)}, ValueError, "leading shape"),
        ({"targets": torch.tensor([0, 1, 10, 2])}, ValueError, r"targets\[2\] = 10 is outside \[0, 10\)"),
        ({"targets": torch.tensor([0, -1, 3, 2])}, ValueError, r"targets\[1\] = -1"),
        ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": "1"}, TypeError, "temperature must be a real number"),
        ({"softcap": 0.0}, ValueError, "softcap must be finite and > 0, got 0.0"),
        ({"softcap": -3.0}, ValueError, "softcap"),
        ({"softcap": float("nan")}, ValueError, "softcap"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"shift": 1}, TypeError, "shift must be a bool"),
        ({"backend": "gpu"}, ValueError, "backend must be one of"),
        ({"shift": True}, ValueError, "shift=True needs a sequence axis"),
    ],
)
def test_bad_inputs_token_nll(kwargs, exc, pattern):
    args = {"logits": torch.randn(4, 10), "targets": torch.tensor([0, 1, 2, 3])}
    args.update(kwargs)
    if kwargs.get("shift"):
        args["logits"], args["targets"] = torch.randn(10), torch.tensor(1)
    logits, targets = args.pop("logits"), args.pop("targets")
    with pytest.raises(exc, match=pattern):
        pplfast.token_nll(logits, targets, **args)
    with pytest.raises(exc, match=pattern):
        pplfast.perplexity(logits, targets, **args)


def test_target_error_names_the_position():
    targets = torch.zeros(2, 3, dtype=torch.long)
    targets[1, 2] = 50
    with pytest.raises(ValueError, match=re.escape("targets[1, 2] = 50 is outside [0, 10)")):
        pplfast.token_nll(torch.randn(2, 3, 10), targets)


def test_ignore_index_inside_vocabulary_is_allowed():
    logits, targets = logits_targets(V=10)
    targets[1] = 7
    out = pplfast.token_nll(logits, targets, ignore_index=7)
    assert out[1] == 0


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        ({"weight": torch.randn(20, 9)}, ValueError, r"weight has shape \(20, 9\) but hidden has width D=8"),
        ({"weight": torch.randn(8, 20)}, ValueError, "looks transposed"),
        ({"weight": torch.randn(20)}, ValueError, "weight must be 2-D"),
        ({"weight": torch.randn(20, 8, dtype=torch.bfloat16)}, TypeError, "weight dtype"),
        ({"weight": torch.randint(0, 3, (20, 8))}, TypeError, "weight must be float32"),
        ({"hidden": torch.randn(6, 8).half()}, TypeError, "weight dtype"),
        ({"bias": torch.randn(21)}, ValueError, r"bias has shape \(21,\)"),
        ({"bias": torch.randn(20, 1)}, ValueError, "bias must be"),
        ({"targets": torch.tensor([0, 1, 2, 3, 4, 20])}, ValueError, r"targets\[5\] = 20 is outside \[0, 20\)"),
        ({"targets": torch.zeros(6)}, TypeError, "targets must be int64 or int32"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, ValueError, "targets has shape"),
        ({"backend": "fast"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs_linear(change, exc, pattern):
    args = {"hidden": torch.randn(6, 8), "weight": torch.randn(20, 8),
            "targets": torch.randint(0, 20, (6,)), "bias": None}
    args.update(change)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=pattern):
        pplfast.linear_token_nll(hidden, weight, targets, **args)
    with pytest.raises(exc, match=pattern):
        pplfast.linear_perplexity(hidden, weight, targets, **args)


def test_devices_must_match(monkeypatch):
    meta_targets = torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="targets is on meta but logits is on cpu"):
        pplfast.token_nll(torch.randn(4, 10), meta_targets)
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        pplfast.linear_token_nll(torch.randn(4, 8), torch.randn(10, 8, device="meta"),
                                 torch.zeros(4, dtype=torch.long))


def test_backend_that_cannot_run_says_why():
    logits, targets = logits_targets()
    with pytest.raises(pplfast.BackendUnavailableError, match='backend="cuda" needs CUDA tensors'):
        pplfast.token_nll(logits, targets, backend="cuda")


def test_env_backend_overrides_auto(monkeypatch):
    logits, targets = logits_targets(V=50)
    seen = []
    from pplfast import _reference_backend

    original = _reference_backend.token_nll

    def spy(*args):
        seen.append("reference")
        return original(*args)

    monkeypatch.setattr(_reference_backend, "token_nll", spy)
    monkeypatch.setenv("PPLFAST_BACKEND", "reference")
    pplfast.token_nll(logits, targets)
    assert seen == ["reference"]
    pplfast.token_nll(logits, targets, backend="cpu")  # an explicit backend wins
    assert seen == ["reference"]
    monkeypatch.setenv("PPLFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PPLFAST_BACKEND must be one of"):
        pplfast.token_nll(logits, targets)


def test_import_does_not_import_optional_modules():
    import subprocess
    import sys

    # torch itself may import some of these; only what `import pplfast` adds counts
    code = ("import sys, torch; before = set(sys.modules); import pplfast; "
            "bad = [m for m in ('triton', 'transformers', 'matplotlib', 'tqdm') "
            "if m in sys.modules and m not in before]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_parameters_with_requires_grad_are_accepted(backend):
    """Model parameters require grad; scoring is forward-only and must not trip autograd."""
    hidden = torch.randn(2, 5, 8)
    weight = torch.nn.Parameter(torch.randn(40, 8))
    targets = torch.randint(0, 40, (2, 5))
    got = pplfast.linear_token_nll(hidden, weight, targets, backend=backend)
    assert not got.requires_grad
    want = reference.linear_token_nll(hidden, weight.detach(), targets)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    logits = torch.randn(3, 11, requires_grad=True)
    assert not pplfast.token_nll(logits, torch.randint(0, 11, (3,)), backend=backend).requires_grad


# ---- check_targets, host syncs, no copy for shift, torch.compile -----------------------------


def test_check_targets_option():
    logits, targets = logits_targets(V=10)
    targets[2] = 10
    with pytest.raises(ValueError, match=re.escape("targets[2] = 10 is outside [0, 10)")):
        pplfast.token_nll(logits, targets)
    with pytest.raises(ValueError, match="outside"):
        pplfast.perplexity(logits, targets, check_targets=True)
    with pytest.raises(TypeError, match="check_targets must be a bool, got 'no'"):
        pplfast.token_nll(logits, targets, check_targets="no")
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=re.escape("targets[2] = 10 is outside [0, 10)")):
        pplfast.linear_perplexity(hidden, weight, targets)
    targets[2] = 3
    for check in (True, False):
        a = pplfast.linear_perplexity(hidden, weight, targets, check_targets=check)
        b = pplfast.perplexity(hidden @ weight.T, targets, check_targets=check)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_torch_compile_fullgraph_eval_step(real_empty):
    """One compiled eval step through both custom ops (shift, softcap, an ignored target)."""

    def step(hidden, weight, targets):
        logits = hidden @ weight.T
        a = pplfast.token_nll(logits, targets, shift=True, softcap=4.0, backend="cpu")
        b = pplfast.linear_token_nll(hidden, weight, targets, shift=True, softcap=4.0,
                                     backend="cpu")
        return a.sum() / (targets[:, 1:] != -100).sum(), b

    hidden, weight = torch.randn(2, 9, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (2, 9))
    targets[1, 3] = -100
    want = step(hidden, weight, targets)
    got = torch.compile(step, fullgraph=True)(hidden, weight, targets)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    expected = reference.linear_token_nll(hidden, weight, targets, shift=True, softcap=4.0)
    torch.testing.assert_close(got[1].double(), expected, rtol=0, atol=2e-5)


# ---- ignore_index outside the range of int32 targets (issue 17, item 6) ----------------------
# No int32 target can equal such an index, so nothing is ignored: the answer is the float64 one
# with every position scored, exactly what the same targets give as int64. (Comparing an int32
# tensor with a Python int wraps the int to 32 bits: 2**40 became 0 and 2**32 + 7 became 7.)

WIDE_IGNORE = [2**40, 2**32 + 7, -(2**32) + 3, 2**31]


def _wide_case(V=10, D=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor([[0, 7, 3, 0], [7, 9, 0, 3]], dtype=torch.int32)
    logits = torch.randn(2, 4, V, generator=gen) * 3
    test = torch.randn(2, 4, V, generator=gen) * 3
    hidden, weight = torch.randn(2, 4, D, generator=gen), torch.randn(V, D, generator=gen)
    hidden_test, weight_test = torch.randn(2, 4, D + 1, generator=gen), torch.randn(V, D + 1,
                                                                                   generator=gen)
    return targets, logits, test, hidden, weight, hidden_test, weight_test


def _wide_calls(targets, logits, test, hidden, weight, hidden_test, weight_test):
    """(name, fn(targets, **options)) of every public op and perplexity on these inputs."""
    return [
        ("token_nll", lambda t, **o: pplfast.token_nll(logits, t, **o)),
        ("linear_token_nll", lambda t, **o: pplfast.linear_token_nll(hidden, weight, t, **o)),
        ("token_stats", lambda t, **o: pplfast.token_stats(logits, t, top_k=3, **o)),
        ("linear_token_stats",
         lambda t, **o: pplfast.linear_token_stats(hidden, weight, t, top_k=3, **o)),
        ("compare", lambda t, **o: pplfast.compare(logits, test, t, **o)),
        ("linear_compare", lambda t, **o: pplfast.linear_compare(hidden, weight, hidden_test,
                                                                 weight_test, t, **o)),
        ("perplexity", lambda t, **o: pplfast.perplexity(logits, t, **o)),
        ("linear_perplexity", lambda t, **o: pplfast.linear_perplexity(hidden, weight, t, **o)),
    ]


def _fields(result):
    if isinstance(result, torch.Tensor):
        return {"value": result}
    return {k: v for k, v in vars(result).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("ignore_index", WIDE_IGNORE)
@pytest.mark.parametrize("shift", [False, True], ids=["no-shift", "shift"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ignore_index_outside_int32_ignores_nothing(backend, shift, ignore_index):
    device = backend_device(backend)
    inputs = [x.to(device) for x in _wide_case()]
    targets = inputs[0]
    for name, fn in _wide_calls(*inputs):
        got = fn(targets, ignore_index=ignore_index, shift=shift, backend=backend)
        # the float64 answer with every position scored (no target equals -100 here)
        want = fn(targets.long(), ignore_index=-100, shift=shift, backend="reference")
        for field, value in _fields(want).items():
            g = _fields(got)[field].cpu()
            assert g.dtype == value.dtype and g.shape == value.shape, (name, field)
            if value.is_floating_point():
                torch.testing.assert_close(g.double(), value.cpu().double(), rtol=1e-5,
                                           atol=1e-5, msg=f"{name}.{field}")
            else:
                assert torch.equal(g, value.cpu()), (name, field, g, value)


@pytest.mark.parametrize("ignore_index", WIDE_IGNORE)
def test_metrics_count_every_position_for_ignore_index_outside_int32(ignore_index):
    targets, logits, test, hidden, weight, *_ = _wide_case()
    want_ppl = math.exp(reference.token_nll(logits, targets.long()).mean().item())
    for update in ("update", "update_linear"):
        metric = pplfast.Perplexity()
        args = (logits,) if update == "update" else (hidden, weight)
        getattr(metric, update)(*args, targets, ignore_index=ignore_index)
        assert metric.num_tokens == targets.numel()
        if update == "update":
            assert metric.compute().perplexity == pytest.approx(want_ppl, rel=1e-5)
    comparison = pplfast.Comparison()
    comparison.update(logits, test, targets, ignore_index=ignore_index)
    assert comparison.num_tokens == targets.numel()
    comparison = pplfast.Comparison()
    comparison.update_tokens(pplfast.compare(logits, test, targets.long()), targets,
                             ignore_index=ignore_index)
    assert comparison.num_tokens == targets.numel()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_int32_target_equal_to_a_wrapped_ignore_index_is_refused(backend):
    """7 is outside [0, 5) and is not ignore_index = 2**32 + 7: the range check must say so
    before any kernel reads column 7 of a 5-wide row (it passed as 'ignored' before)."""
    device = backend_device(backend)
    inputs = [x.to(device) for x in _wide_case(V=5)]
    targets = torch.tensor([[0, 1, 3, 0], [2, 7, 0, 3]], dtype=torch.int32, device=device)
    for name, fn in _wide_calls(*inputs):
        with pytest.raises(ValueError, match=re.escape(
                f"targets[1, 1] = 7 is outside [0, 5) and is not ignore_index={2**32 + 7}")):
            fn(targets, ignore_index=2**32 + 7, backend=backend)
