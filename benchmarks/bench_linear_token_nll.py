"""Hidden-states path: ``pplfast.linear_token_nll`` vs ``F.linear`` + ``F.cross_entropy``,
``F.linear_cross_entropy`` with chunking options (PyTorch >= 2.13), and on GPU, when installed,
Cut Cross-Entropy and Liger's fused linear cross entropy (forward only). The ``matmul`` row
times a plain ``hidden @ weight.T`` of the same shape: the rate the others are measured against.

extra_info per case: flops (2*N*D*V), TFLOP/s at the median time, peak extra memory of one call.
"""
import pytest
import torch

from pplfast import bench

from conftest import DEVICE, SIZE, implementation_params, median_seconds, record, shape_id, synced

SHAPES = {
    "small": [(256, 512, 32000)],
    "full": [(8192, 4096, 131072)] if DEVICE.type == "cuda" else [(4096, 1024, 128256)],
}[SIZE]
DTYPES = ["bf16"] if DEVICE.type == "cuda" else ["fp32"]
IMPLS = {impl.name: impl for impl in bench.implementations("linear", DEVICE, "auto")[0]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("impl_name", implementation_params("linear"))
def test_linear_token_nll(benchmark, impl_name, shape, dtype, peak_memory):
    impl = IMPLS[impl_name]
    hidden, weight, targets = bench.make_inputs("linear", shape, dtype, DEVICE)
    benchmark.group = f"linear_token_nll {shape_id(shape)} {dtype}"
    with torch.inference_mode():
        benchmark(synced(lambda: impl.fn(hidden, weight, targets)))
        peak = peak_memory("linear", shape, dtype, impl_name, lambda: impl.fn(hidden, weight, targets))
    flops = bench.linear_flops(shape)
    seconds = median_seconds(benchmark)
    record(benchmark, device=DEVICE.type, impl=impl.label, flops=flops,
           tflops=None if seconds is None else flops / seconds / 1e12, peak_extra_bytes=peak)
