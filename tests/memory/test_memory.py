"""No N×V temporary on CPU: extra peak memory of one call, measured in a fresh process
(:mod:`memory_harness`). The live control (``F.cross_entropy``, which builds the log-softmax)
must exceed the same bound, so the test can fail.
"""
import pytest

from memory_harness import in_child, peak_growth


def child(N, V, dtype, which):
    """In the child: the extra peak of one ``which`` call on ``(N, V)`` logits."""
    import torch
    import torch.nn.functional as F

    import pplfast

    dtype = getattr(torch, dtype)
    logits = torch.randn(N, V).to(dtype)
    targets = torch.randint(0, V, (N,))
    run = {
        "pplfast": lambda: pplfast.token_nll(logits, targets, backend="cpu"),
        "control": lambda: F.cross_entropy(logits, targets, reduction="none"),
    }[which]
    pplfast.token_nll(logits[:2], targets[:2], backend="cpu")  # load the extension first
    out, extra = peak_growth(run, strict=False)
    return {"extra": extra, "logits_bytes": logits.numel() * logits.element_size(),
            "finite": bool(torch.isfinite(out).all())}


def extra_peak(N, V, dtype, which):
    return in_child(__file__, "child", N=N, V=V, dtype=dtype, which=which)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_nll_has_no_vocabulary_sized_temporary(dtype):
    N, V = 512, 128256
    ours = extra_peak(N, V, dtype, "pplfast")
    bound = 0.01 * ours["logits_bytes"]
    assert ours["finite"]
    assert ours["extra"] <= bound, f"extra peak {ours['extra']} B > 1% of logits ({bound:.0f} B)"
    control = extra_peak(N, V, dtype, "control")
    assert control["extra"] > bound, f"control stayed within the bound: {control}"
