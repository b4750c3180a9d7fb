import os
import sys
from pathlib import Path

import pytest
import torch  # importing torch does not import triton

# the test folders (engine/, kernels/, models/, corpus/, cli/, memory/) import the shared
# helpers of this folder as `from helpers import ...`
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The Triton interpreter is chosen when triton is first imported; without a GPU it is how the
# Triton kernels run (on CPU tensors). On a GPU machine the kernels run compiled on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_empty, _empty_like = torch.empty, torch.empty_like
GPU_SKIP = "needs a CUDA GPU"


def _nan_empty(*args, **kwargs):
    out = _empty(*args, **kwargs)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


def _nan_empty_like(*args, **kwargs):
    out = _empty_like(*args, **kwargs)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Outputs allocated with torch.empty start as NaN, so an element no kernel wrote fails."""
    monkeypatch.setattr(torch, "empty", _nan_empty)
    monkeypatch.setattr(torch, "empty_like", _nan_empty_like)
    yield


@pytest.fixture
def real_empty(monkeypatch):
    """torch.empty as it is (not NaN-filled), for tests that compile: the compiler allocates
    with it too. Dynamo's caches are cleared before and after."""
    import torch._dynamo

    monkeypatch.setattr(torch, "empty", _empty)
    monkeypatch.setattr(torch, "empty_like", _empty_like)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def host_reads(monkeypatch):
    """The reads of tensor data by the host (each one a device sync on a GPU), as a list of the
    methods that read."""
    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    real_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero",
                        lambda *a, **k: reads.append("nonzero") or real_nonzero(*a, **k))
    return reads


@pytest.fixture(autouse=True)
def grad_mode_kept():
    """No public entry point may switch autograd off for its caller (a scoped no_grad only)."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "autograd was left disabled after this test"


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """GPU-only skips in one line; any other skip with its reason (those deserve a look)."""
    skipped = terminalreporter.stats.get("skipped", [])
    on_gpu = [GPU_SKIP in str(r.longrepr) or "cuda" in getattr(r, "keywords", {})
              for r in skipped]
    gpu = [r for r, g in zip(skipped, on_gpu) if g]
    others = [r for r, g in zip(skipped, on_gpu) if not g]
    if gpu:
        terminalreporter.write_line(
            f"{len(gpu)} GPU-only tests skipped: no CUDA device here (they run where there is one)")
    reasons = {}
    for report in others:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons.setdefault(reason, []).append(report.nodeid)
    for reason, nodes in reasons.items():
        where = nodes[0] if len(nodes) == 1 else f"{len(nodes)} tests, e.g. {nodes[0]}"
        terminalreporter.write_line(f"skipped ({where}): {reason}")
