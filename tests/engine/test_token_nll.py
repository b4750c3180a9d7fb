"""token_nll on every backend that can run here, against the float64 reference.

"cpu" always runs; "triton" runs compiled on a GPU or under TRITON_INTERPRET=1 on CPU tensors
(small shapes); "cuda" needs a GPU.
"""
import pytest
import torch

import pplfast
from pplfast import reference

from helpers import KERNEL_BACKENDS, assert_nll_close, backend_device, row_lse

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": 3},
    "shift": {"shift": True},
    "softcap": {"softcap": 2.5},
    "temperature": {"temperature": 0.7},
    "softcap30-temp1.3": {"softcap": 30.0, "temperature": 1.3},
}
# (leading shape, V): V = 1, tiny, not a multiple of any block, a real vocabulary
SHAPES = [((2, 3), 1), ((1, 5), 7), ((3, 21), 507), ((2, 3), 50257)]


def make(lead, V, dtype, device, scale=3.0):
    logits = (torch.randn(*lead, V) * scale).to(dtype).to(device)
    targets = torch.randint(0, V, lead).to(device)
    return logits, targets


def check(logits, targets, backend, **options):
    got = pplfast.token_nll(logits, targets, backend=backend, **options)
    want = reference.token_nll(logits.cpu(), targets.cpu(), **options)
    lse = row_lse(logits.cpu(), softcap=options.get("softcap"),
                  temperature=options.get("temperature", 1.0), shift=options.get("shift", False))
    assert got.device == logits.device
    assert_nll_close(got.cpu(), want, lse)
    return got


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("lead,V", SHAPES, ids=[f"N{l[0]}x{l[1]}-V{v}" for l, v in SHAPES])
def test_matches_reference(backend, option, dtype, lead, V):
    options = OPTIONS[option]
    logits, targets = make(lead, V, dtype, backend_device(backend))
    if "ignore_index" in options:
        targets[..., ::2] = options["ignore_index"]
    check(logits, targets, backend, **options)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_non_contiguous_layouts(backend, dtype):
    device = backend_device(backend)
    base = (torch.randn(4, 6, 2 * 333) * 3).to(dtype).to(device)
    targets = torch.randint(0, 333, (4, 6), device=device)
    check(base[..., ::2], targets, backend)  # vocabulary stride 2
    check(base[..., :333].transpose(0, 1), targets.transpose(0, 1), backend)  # swapped leading dims
    check(base[:, :, 5:338], targets, backend, shift=True)  # offset rows, shifted view
    row = base[:1, :1, :333]
    check(row.expand(3, 6, 333), torch.randint(0, 333, (3, 6), device=device), backend)  # stride 0
    check(base[1, 2, :333], targets[0, 0], backend)  # a single row: 0-dim output


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_int32_targets_and_more_dims(backend):
    device = backend_device(backend)
    logits, targets = make((2, 2, 3), 129, torch.float32, device)
    got = check(logits, targets.int(), backend)
    assert got.shape == (2, 2, 3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_extremes(backend, dtype):
    device = backend_device(backend)
    V = 300
    logits = torch.randn(8, V) * 3
    logits[0] *= 1e4 / 3  # large magnitudes
    logits[1, ::3] = float("-inf")  # -inf entries
    logits[2, 5] = float("-inf")  # target at -inf -> +inf
    logits[3] = float("-inf")  # whole row -inf -> NaN (as the reference)
    logits[4, 17] = float("inf")  # +inf entry -> lse = +inf
    logits[5] = -1e4  # constant row
    logits[6, :] = 0.0
    logits[7] = torch.linspace(-20, 20, V)
    targets = torch.tensor([0, 1, 5, 2, 3, 4, 299, 150])
    logits = logits.to(dtype).to(device)
    got = check(logits, targets.to(device), backend)
    assert torch.isinf(got[2]) and got[2] > 0
    assert torch.isnan(got[3])
    for options in ({"softcap": 30.0}, {"temperature": 2.0}):
        check(logits, targets.to(device), backend, **options)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_stays_local(backend):
    device = backend_device(backend)
    logits, targets = make((6,), 1000, torch.float32, "cpu")
    logits[2, 10] = float("nan")
    logits[4, 999] = float("nan")
    targets[4] = -100  # NaN in an ignored row changes nothing
    got = pplfast.token_nll(logits.to(device), targets.to(device), backend=backend).cpu()
    assert torch.isnan(got[2])
    assert got[4] == 0
    keep = [0, 1, 3, 5]
    want = reference.token_nll(logits[keep], targets[keep])
    assert_nll_close(got[keep], want, row_lse(logits[keep]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_and_all_ignored(backend):
    device = backend_device(backend)
    empty = pplfast.token_nll(torch.randn(0, 5, 11, device=device),
                              torch.zeros(0, 5, dtype=torch.long, device=device), backend=backend)
    assert empty.shape == (0, 5) and empty.dtype == torch.float32
    logits, targets = make((3, 4), 50, torch.float32, device)
    targets.fill_(-100)
    got = pplfast.token_nll(logits, targets, backend=backend)
    assert torch.equal(got.cpu(), torch.zeros(3, 4))
    assert torch.isnan(pplfast.perplexity(logits, targets, backend=backend))
    # zero-width vocabulary: fine as long as nothing is scored
    got = pplfast.token_nll(torch.randn(2, 0, device=device),
                            torch.full((2,), -100, device=device), backend=backend)
    assert torch.equal(got.cpu(), torch.zeros(2))
    # shift on a length-1 sequence leaves nothing to score
    got = pplfast.token_nll(torch.randn(2, 1, 9, device=device),
                            torch.zeros(2, 1, dtype=torch.long, device=device), shift=True,
                            backend=backend)
    assert got.shape == (2, 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_perplexity(backend):
    device = backend_device(backend)
    logits, targets = make((3, 17), 77, torch.bfloat16, device)
    targets[0, :5] = -100
    nll = reference.token_nll(logits.cpu(), targets.cpu(), shift=True)
    scored = (targets.cpu()[:, 1:] != -100).sum()
    want = torch.exp(nll.sum() / scored)
    got = pplfast.perplexity(logits, targets, shift=True, backend=backend)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - want.item()) <= 4e-6 * want.item()


def test_cpu_column_splits_when_rows_are_few():
    """Fewer rows than threads: rows are split into column ranges and merged."""
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for rows in (1, 2, 3):
            logits, targets = make((rows,), 70001, torch.float32, "cpu")
            logits[0, 65000] = 40.0  # the maximum sits in the last split
            check(logits, targets, "cpu")
            check(logits.bfloat16(), targets, "cpu", softcap=20.0)
    finally:
        torch.set_num_threads(old)


def test_cpu_running_state_matches_one_pass():
    """nll_update over vocabulary slabs, then nll_finish, equals token_nll in one pass."""
    from pplfast import _cpu

    for dtype in DTYPES:
        logits, targets = make((37,), 5003, dtype, "cpu")
        targets[::5] = -100
        logits[3, 4000:] = float("-inf")
        state = _cpu.nll_state(37)
        for start in range(0, 5003, 1024):
            _cpu.nll_update(logits[None, :, start : start + 1024], targets, start, -100, 5.0, 0.9,
                            state)
        got = _cpu.nll_finish(state, targets, -100, 0.9)
        want = reference.token_nll(logits, targets, softcap=5.0, temperature=0.9)
        assert_nll_close(got, want, row_lse(logits, softcap=5.0, temperature=0.9))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cpu_scalar_and_vector_transforms_agree_bitwise(dtype):
    """The CPU kernel's scalar transform (strided rows, block tails, the target logit) performs
    the AVX2 transform's fp32 operations in the same order: a strided row and its contiguous copy
    give the same bits, so the target can never exceed the row's streamed maximum. Logits span
    both tanh branches (|x / softcap| below and above 0.625) and exp's whole range."""
    V = 1003
    base = (torch.randn(6, 2 * V) * 25).to(dtype)
    strided = base[:, ::2]
    contiguous = strided.contiguous()
    targets = torch.randint(0, V, (6,))
    for softcap, temperature in ((None, 0.7), (30.0, 1.0), (30.0, 0.7), (2.0, 1.3)):
        kw = dict(softcap=softcap, temperature=temperature, backend="cpu")
        a = pplfast.token_nll(strided, targets, **kw)
        b = pplfast.token_nll(contiguous, targets, **kw)
        assert torch.equal(a, b), (softcap, temperature, (a - b).abs().max().item())
        # confident tokens through the scalar target path: 0, never below
        x = contiguous.clone()
        x[torch.arange(6), targets] = 200.0
        assert bool((pplfast.token_nll(x, targets, **kw) >= 0).all())
