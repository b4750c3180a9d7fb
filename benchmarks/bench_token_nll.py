"""Logits path: ``pplfast.token_nll`` vs ``F.cross_entropy(reduction="none")``,
``log_softmax`` + ``gather`` and (GPU, when installed) Liger's cross entropy.

extra_info per case: logits bytes, GB/s (bytes / median time), fraction of the read bandwidth
measured in the same session, peak extra memory of one call.
"""
import pytest
import torch

from pplfast import bench

from conftest import DEVICE, SIZE, implementation_params, median_seconds, record, shape_id, synced

SHAPES = {
    "small": [(256, 32000), (256, 128256)],
    "full": [(4096, 32000), (4096, 50257), (4096, 128256)],
}[SIZE]
DTYPES = ["fp32", "bf16"]
IMPLS = {impl.name: impl for impl in bench.implementations("logits", DEVICE, "auto")[0]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("impl_name", implementation_params("logits"))
def test_token_nll(benchmark, impl_name, shape, dtype, read_bandwidth, peak_memory):
    impl = IMPLS[impl_name]
    logits, targets = bench.make_inputs("logits", shape, dtype, DEVICE)
    if impl.clobbers_input:
        logits = logits.clone()
    benchmark.group = f"token_nll {shape_id(shape)} {dtype}"
    with torch.inference_mode():
        benchmark(synced(lambda: impl.fn(logits, targets)))
        peak = peak_memory("logits", shape, dtype, impl_name, lambda: impl.fn(logits, targets))
    nbytes = bench.logits_bytes(shape, dtype)
    seconds = median_seconds(benchmark)
    gbps = None if seconds is None else nbytes / seconds / 1e9
    record(benchmark, device=DEVICE.type, impl=impl.label, logits_bytes=nbytes, gbps=gbps,
           read_bw_gbps=read_bandwidth["gbps"], read_bw_method=read_bandwidth["method"],
           read_bw_fraction=None if gbps is None else gbps / read_bandwidth["gbps"],
           peak_extra_bytes=peak)
