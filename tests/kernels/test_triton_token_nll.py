"""Triton logits kernel (``kernels/token_nll.py``): what is specific to it.

Runs on CUDA tensors when a GPU exists, else on CPU tensors under ``TRITON_INTERPRET=1`` (set by
conftest). Both code paths are forced through the launcher's ``num_splits`` keyword: ``1`` is the
one-pass kernel, more is the split + merge kernels; ``block_v`` forces small blocks so that block
boundaries, the aligned-head peel and the tail all occur at small V.
"""
from __future__ import annotations

import pytest
import torch

from helpers import NUMPY_FLOAT_WARNINGS, assert_nll_close, logits_past_2_pow_31, row_lse
from pplfast import reference

pytestmark = [
    pytest.mark.interpreter,
    *NUMPY_FLOAT_WARNINGS,
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = {"onepass": 1, "split": 3}
IGNORE = -100
SM_COUNT = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else None


def _forward(logits3, targets, *, ignore_index=IGNORE, softcap=None, temperature=1.0, **kw):
    from pplfast.kernels.token_nll import token_nll_forward

    kw.setdefault("sm_count", SM_COUNT)
    return token_nll_forward(logits3, targets, ignore_index, softcap, temperature, **kw)


def _check(logits3, targets, *, ignore_index=IGNORE, softcap=None, temperature=1.0, **kw):
    """Run the kernel on a (B, T, V) view and compare with the float64 reference."""
    out = _forward(logits3, targets, ignore_index=ignore_index, softcap=softcap,
                   temperature=temperature, **kw)
    V = logits3.shape[-1]
    expected = reference.token_nll(logits3.reshape(-1, V), targets, ignore_index=ignore_index,
                                   softcap=softcap, temperature=temperature)
    lse = row_lse(logits3.reshape(-1, V), softcap=softcap, temperature=temperature)
    assert_nll_close(out, expected, lse)
    return out


def _targets(rows, V, *, ignored=()):
    t = torch.randint(0, V, (rows,), device=DEVICE)
    for r in ignored:
        t[r] = IGNORE
    return t


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("V", [1, 7, 507])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_awkward_vocab(dtype, V, path):
    x = (torch.randn(2, 3, V, device=DEVICE) * 4).to(dtype)
    _check(x, _targets(6, V, ignored=(4,)), num_splits=PATHS[path])


@pytest.mark.parametrize("path", ["onepass", "split", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_real_vocabulary_few_rows(dtype, path):
    # GPT-2's 50257: rows start off 16-byte boundaries, so every row is peeled
    V = 50257
    x = (torch.randn(1, 2, V, device=DEVICE) * 3).to(dtype)
    _check(x, _targets(2, V), num_splits=None if path == "auto" else PATHS[path])


@pytest.mark.parametrize("num_splits", [1, 2, 4, 7])
@pytest.mark.parametrize("V", [15, 16, 17, 100, 129])
def test_block_and_chunk_boundaries(V, num_splits):
    # blocks of 16 bf16 entries: full blocks, the masked tail and the aligned-head peel all occur
    x = (torch.randn(3, 2, V, device=DEVICE) * 5).to(torch.bfloat16)
    _check(x, _targets(6, V), num_splits=num_splits, block_v=16)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("layout", ["vocab_stride_2", "shift_slice", "transposed", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_noncontiguous_layouts(dtype, layout, path):
    B, T, V = 2, 4, 301
    if layout == "vocab_stride_2":
        x = torch.randn(B, T, 2 * V, device=DEVICE).to(dtype)[..., ::2]
    elif layout == "shift_slice":
        x = torch.randn(B, T + 1, V, device=DEVICE).to(dtype)[:, :-1]
    elif layout == "transposed":
        x = torch.randn(T, B, V, device=DEVICE).to(dtype).transpose(0, 1)
    else:  # base pointer off 16-byte alignment: no vector loads, no peel
        x = torch.randn(B * T * V + 1, device=DEVICE).to(dtype)[1:].view(B, T, V)
    assert not x.is_contiguous() or layout == "misaligned"
    _check(x, _targets(B * T, V, ignored=(1,)), num_splits=PATHS[path], block_v=64)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("softcap,temperature", [(None, 0.7), (30.0, 1.0), (5.0, 2.0), (0.5, 0.3)])
@pytest.mark.parametrize("V", [7, 507])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_temperature(dtype, V, softcap, temperature, path):
    # spread from |x/softcap| << 1 (the polynomial branch of tanh) to >> 1 (the exp branch)
    scale = torch.logspace(-3, 1.5, V, device=DEVICE)[torch.randperm(V, device=DEVICE)]
    x = (torch.randn(2, 3, V, device=DEVICE) * scale).to(dtype)
    _check(x, _targets(6, V, ignored=(0,)), softcap=softcap, temperature=temperature,
           num_splits=PATHS[path])


@pytest.mark.parametrize("y", [1e-6, 1e-3, 0.3, 0.62, 0.63, 2.0, 20.0])
def test_softcap_accuracy_near_zero(y):
    # V = 2 rows built so that the NLL stays O(1) while z = softcap * tanh(y) must be exact to
    # ~1e-7 relative: 1 - 2/(exp(2y)+1) alone would miss by ~1e-7 * softcap near y = 0
    softcap = 50.0
    vals = torch.tensor([y, -y], dtype=torch.float64, device=DEVICE) * softcap
    x = vals.float().reshape(1, 1, 2).expand(1, 4, 2).contiguous()
    _check(x, torch.tensor([0, 1, 0, 1], device=DEVICE), softcap=softcap, num_splits=1)


@pytest.mark.parametrize("path", list(PATHS))
def test_ignore_index(path):
    V = 200
    x = torch.randn(2, 4, V, device=DEVICE)
    # ignored rows are never read: NaN there must not leak
    x[0, 1] = float("nan")
    t = _targets(8, V)
    t[1] = 7
    out = _check(x, t, ignore_index=7, num_splits=PATHS[path], block_v=64)
    assert out[1].item() == 0.0
    # a valid class index as ignore_index, and every row ignored
    t_all = torch.full((8,), 3, device=DEVICE)
    out = _forward(x, t_all, ignore_index=3, num_splits=PATHS[path], block_v=64)
    assert torch.equal(out.cpu(), torch.zeros(8))


def _extreme_rows(V, dtype):
    """Rows with large magnitudes and non-finite entries, with the targets that stress them."""
    big = 1e4
    x = torch.randn(8, V, dtype=torch.float64, device=DEVICE) * 3
    t = torch.randint(1, V, (8,), device=DEVICE)
    x[0] = torch.where(torch.rand(V, device=DEVICE) < 0.5, big, -big) + x[0]  # +-1e4
    x[1, ::3] = -float("inf")                                                 # -inf entries
    t[1] = 3                                                                  # target -inf: +inf
    x[2] = -float("inf")                                                      # all -inf: NaN
    x[3, 5] = float("inf")                                                    # +inf: NLL +inf
    t[3] = 1
    x[4, V // 2] = float("inf")                                               # target +inf: NaN
    t[4] = V // 2
    x[5] = -big + x[5]                                                        # all near -1e4
    x[6, 2] = float("nan")                                                    # NaN: row 6 only
    x[7, 1:] = -float("inf")                                                  # one finite entry
    t[7] = 0
    return x.to(dtype).reshape(2, 4, V), t


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extremes_and_nan_locality(dtype, path):
    V = 300
    x, t = _extreme_rows(V, dtype)
    out = _check(x, t, num_splits=PATHS[path], block_v=64).cpu()
    assert out[1] == float("inf") and out[3] == float("inf")
    assert torch.isnan(out[2]) and torch.isnan(out[4]) and torch.isnan(out[6])
    assert int(torch.isnan(out).sum()) == 3


@pytest.mark.parametrize("path", list(PATHS))
def test_extremes_with_softcap(path):
    # capping maps +-inf to +-softcap, so non-finite entries become finite
    V = 300
    x, t = _extreme_rows(V, torch.float32)
    out = _check(x, t, softcap=20.0, temperature=0.5, num_splits=PATHS[path], block_v=64).cpu()
    assert int(torch.isnan(out).sum()) == 1  # only the NaN row


def test_split_count_is_reduced_to_nonempty_chunks():
    # 40 requested chunks of a 50-entry row: chunks are aligned, so fewer remain, none empty
    x = torch.randn(1, 3, 50, device=DEVICE)
    _check(x, _targets(3, 50), num_splits=40)


def test_int64_row_offsets():
    # rows x V passes 2^31 elements: row 2 starts past the int32 range. The storage is never
    # touched but for the three rows (torch.empty would be NaN-filled by conftest: 4 GiB).
    V = 64
    stride = (1 << 30) + 64
    storage = torch.UntypedStorage((2 * stride + V) * 2, device=DEVICE)
    x = torch.tensor([], dtype=torch.bfloat16, device=DEVICE).set_(storage, 0, (3, 1, V),
                                                                     (stride, V, 1))
    for r in range(3):
        x[r, 0].copy_(torch.randn(V, device=DEVICE))
    t = _targets(3, V)
    for num_splits in (1, 2):
        out = _forward(x, t, num_splits=num_splits, block_v=16)
        rows = torch.stack([x[r, 0] for r in range(3)])
        assert_nll_close(out, reference.token_nll(rows, t), row_lse(rows))


def test_empty_and_zero_vocab():
    out = _forward(torch.randn(0, 3, 10, device=DEVICE), torch.zeros(0, dtype=torch.long,
                                                                     device=DEVICE))
    assert out.shape == (0,) and out.dtype == torch.float32
    out = _forward(torch.randn(1, 2, 0, device=DEVICE), torch.full((2,), IGNORE, device=DEVICE))
    assert torch.equal(out.cpu(), torch.zeros(2))


def test_launcher_rejects_bad_arguments():
    x = torch.randn(1, 2, 10, device=DEVICE)
    t = _targets(2, 10)
    with pytest.raises(ValueError, match="block_v"):
        _forward(x, t, block_v=12)
    with pytest.raises(ValueError, match="num_splits"):
        _forward(x, t, num_splits=0)
    with pytest.raises(ValueError, match="targets"):
        _forward(x, t.int())


def test_public_api_end_to_end():
    # through pplfast.token_nll: shift=True hands the kernel a logits[:, :-1] view
    import pplfast

    V = 257
    x = torch.randn(2, 5, V, device=DEVICE).to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 5), device=DEVICE)
    ids[1, 2] = IGNORE
    out = pplfast.token_nll(x, ids, shift=True, softcap=15.0, backend="triton")
    expected = reference.token_nll(x, ids, shift=True, softcap=15.0)
    assert_nll_close(out, expected, row_lse(x, softcap=15.0, shift=True))
    assert out.shape == (2, 4)


@pytest.mark.cuda
def test_autotune_matches():
    V = 32000
    x = torch.randn(600, V, device="cuda", dtype=torch.bfloat16).view(2, 300, V)
    _check(x, _targets(600, V, ignored=(5,)), autotune=True)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 100, 1000])
def test_gpu_default_paths(rows):
    # rows < 2 x SM count takes the split path, more rows the one-pass kernel
    V = 128256
    x = torch.randn(1, rows, V, device="cuda", dtype=torch.bfloat16) * 4
    _check(x, _targets(rows, V))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.3), (20.0, 0.7)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_confident_tokens_never_negative(dtype, softcap, temperature, path):
    # the target dominates its row by thousands: the true NLL is ~0 and must not come out below
    V = 300
    x = torch.randn(2, 4, V, device=DEVICE) * 3
    t = _targets(8, V)
    x.view(8, V)[torch.arange(8), t] = torch.linspace(50.0, 1e4, 8, device=DEVICE)
    out = _check(x.to(dtype), t, softcap=softcap, temperature=temperature,
                 num_splits=PATHS[path], block_v=64)
    assert bool((out >= 0).all()), out


@pytest.mark.parametrize("V,block_v", [(507, None), (301, 64), (50257, None), (100, 16),
                                       (129, 16)])
def test_split_cases_reach_the_split_kernel(V, block_v):
    # the "split" cases above run the split + merge kernels on the GPU as in the interpreter:
    # chunks are whole blocks (a multiple of 16 entries), not of a GPU-only alignment
    from pplfast.kernels._plan import plan

    for on_gpu in (False, True):
        n_split, chunk, block, _ = plan(6, V, on_gpu=on_gpu, dtype=torch.bfloat16, sm_count=4,
                                        num_splits=3, block_v=block_v)
        assert n_split == 3 and chunk % block == 0 and chunk % 16 == 0, (on_gpu, chunk, block)


def test_split_plan_on_gpus():
    from pplfast.kernels._plan import LOGITS_CONFIG as CONFIG
    from pplfast.kernels._plan import plan

    # GPT-2's vocabulary, one row, 132 SMs: 25 chunks of 2048 = 8 blocks of 256, so that past
    # the aligned head every block but the last is unmasked
    assert plan(1, 50257, on_gpu=True, dtype=torch.bfloat16, sm_count=132) == (25, 2048, 256, 1)
    # enough rows: one pass with the fixed configuration
    assert plan(1000, 128256, on_gpu=True, dtype=torch.bfloat16, sm_count=132) == (
        1, 128256, CONFIG[0], CONFIG[2])
    for rows, V in ((1, 128256), (7, 262144), (100, 32000), (2, 4097)):
        n_split, chunk, block, _ = plan(rows, V, on_gpu=True, dtype=torch.float32, sm_count=132)
        assert n_split > 1 and chunk % block == 0 and (n_split - 1) * chunk < V <= n_split * chunk


def test_sm_count_required_for_cuda_tensors():
    # CPU tensors (the interpreter) default to a small count; CUDA tensors need the real one
    x = torch.randn(1, 2, 10, device=DEVICE)
    t = _targets(2, 10)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="sm_count"):
            _forward(x, t, sm_count=None)
        assert _forward(x, t, sm_count=None, num_splits=1).shape == (2,)
    else:
        assert _forward(x, t, sm_count=None).shape == (2,)


@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gpu_tensors_on_another_device(num_splits):
    # tensors on the last GPU while device 0 is current (one GPU: the guard is still taken)
    import pplfast

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x = (torch.randn(5, 7, 3001, device=device) * 3).to(torch.float16)
    t = torch.randint(0, 3001, (35,), device=device)
    with torch.cuda.device(0):
        got = _forward(x, t, num_splits=num_splits)
        api = pplfast.token_nll(x, t.view(5, 7), backend="triton")
        assert torch.cuda.current_device() == 0
    assert got.device == device and api.device == device
    want = reference.token_nll(x.reshape(-1, 3001), t)
    assert_nll_close(got, want, row_lse(x.reshape(-1, 3001)))
    assert_nll_close(api.reshape(-1), want, row_lse(x.reshape(-1, 3001)))


@pytest.mark.cuda
def test_gpu_more_than_2_pow_31_logits():
    """N x V > 2^31 in bf16 (4.3 GB): rows past element 2^31 must be read where they are."""
    logits, targets = logits_past_2_pow_31()
    N = logits.shape[0]
    for num_splits in (1, 3):
        got = _forward(logits.unsqueeze(0), targets, num_splits=num_splits)
        for rows in (slice(N - 256, N), slice(0, 64)):
            assert_nll_close(got[rows], reference.token_nll(logits[rows], targets[rows]),
                             row_lse(logits[rows]), what=f"rows {rows}, splits={num_splits}")
        assert got[-2].item() == pytest.approx(0.0, abs=1e-6)
    view = logits[N - 3 :: 2]  # rows past 2^31 elements through a strided view
    got = _forward(view.unsqueeze(0), targets[N - 3 :: 2].contiguous())
    assert_nll_close(got, reference.token_nll(view, targets[N - 3 :: 2]), row_lse(view))
