"""pytest-benchmark suite of pplfast against its peers (outside the default ``tests/`` run).

Run: ``pytest benchmarks/ --benchmark-only``. Files named ``bench_*.py`` are collected here.

Environment variables:

| variable               | values          | default                         | effect                              |
| ---------------------- | --------------- | ------------------------------- | ----------------------------------- |
| ``PPLFAST_BENCH_SIZE`` | ``small``/``full`` | ``full`` on GPU, ``small`` on CPU | shape set (``full`` = realistic)   |
| ``PPLFAST_BENCH_MEMORY`` | ``1``/``0``   | ``1``                           | record peak extra memory per case   |
| ``PPLFAST_BACKEND``    | backend name    | ``auto``                        | the pplfast backend timed           |
"""
import os

import pytest
import torch

from pplfast import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = os.environ.get("PPLFAST_BENCH_SIZE", "full" if DEVICE.type == "cuda" else "small")
if SIZE not in ("small", "full"):
    raise pytest.UsageError(f"PPLFAST_BENCH_SIZE must be small or full, got {SIZE!r}")
MEMORY = os.environ.get("PPLFAST_BENCH_MEMORY", "1") not in ("0", "")
BACKEND = "auto"  # PPLFAST_BACKEND, when set, is applied by the library itself


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself, whatever their name
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)


def implementation_params(path):
    """pytest params over the implementations of ``path``; unavailable peers show as skips."""
    impls, skipped = bench.implementations(path, DEVICE, BACKEND)
    params = [pytest.param(impl.name, id=impl.name) for impl in impls]
    params += [pytest.param(name, id=name, marks=pytest.mark.skip(reason=why)) for name, why in skipped]
    return params


def shape_id(shape):
    names = ("N", "V") if len(shape) == 2 else ("N", "D", "V")
    return "-".join(f"{n}{v}" for n, v in zip(names, shape))


def synced(fn):
    """The timed function: on GPU, wait for the kernels so the wall clock covers them."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return call


@pytest.fixture(scope="session")
def read_bandwidth():
    """This machine's read (CPU) or copy (GPU) bandwidth, measured once per session."""
    nbytes = (256 if SIZE == "small" else bench.DEFAULT_BW_MIB[DEVICE.type]) * bench.MiB
    return bench.read_bandwidth(DEVICE, nbytes)


@pytest.fixture(scope="session")
def peak_memory():
    """``peak(path, shape, dtype, impl_name, fn)`` -> bytes the call adds at its peak, or None.

    CPU: all implementations of one case are probed together in one separate process (VmHWM
    growth over each call); GPU: the CUDA allocator's peak over one call of ``fn``.
    """
    cache = {}

    def peak(path, shape, dtype, impl_name, fn):
        if not MEMORY:
            return None
        if DEVICE.type == "cuda":
            return bench.cuda_peak_extra(fn, DEVICE)
        key = (path, tuple(shape), dtype)
        if key not in cache:
            names = [impl.name for impl in bench.implementations(path, DEVICE, BACKEND)[0]]
            found = cache[key] = {}
            case = {"path": path, "shape": list(shape), "dtype": dtype, "backend": BACKEND,
                    "impls": names}
            bench.cpu_peak_extra([case], lambda k, name, msg: found.__setitem__(name, msg.get("bytes")))
        return cache[key].get(impl_name)

    return peak


def record(benchmark, **info):
    benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})


def median_seconds(benchmark):
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    return stats.stats.median
