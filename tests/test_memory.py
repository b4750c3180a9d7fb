"""No N×V temporary on CPU: extra peak memory of one call, measured in a fresh process.

The child resets its peak-RSS counter (``/proc/self/clear_refs``), reads ``VmHWM`` before and
after the measured call, and reports the difference. ``ru_maxrss`` is not used: a child can
inherit its parent's high-water mark. The live control (``F.cross_entropy``, which builds the
log-softmax) must exceed the same bound, so the test can fail.
"""
import textwrap

import pytest

from helpers import run_json_child

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import torch.nn.functional as F
    import pplfast
    from pplfast._memprobe import reset_peak, status_bytes

    N, V, dtype, which = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
    logits = torch.randn(N, V).to(dtype)
    targets = torch.randint(0, V, (N,))
    run = {
        "pplfast": lambda: pplfast.token_nll(logits, targets, backend="cpu"),
        "control": lambda: F.cross_entropy(logits, targets, reduction="none"),
    }[which]
    pplfast.token_nll(logits[:2], targets[:2], backend="cpu")  # load the extension first
    reset_peak()
    before = status_bytes("VmHWM")
    out = run()
    after = status_bytes("VmHWM")
    print(json.dumps({"extra": after - before, "logits_bytes": logits.numel() * logits.element_size(),
                      "finite": bool(torch.isfinite(out).all())}))
    """
)


def extra_peak(N, V, dtype, which):
    return run_json_child(["-c", CHILD, N, V, dtype, which])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_nll_has_no_vocabulary_sized_temporary(dtype):
    N, V = 512, 128256
    ours = extra_peak(N, V, dtype, "pplfast")
    bound = 0.01 * ours["logits_bytes"]
    assert ours["finite"]
    assert ours["extra"] <= bound, f"extra peak {ours['extra']} B > 1% of logits ({bound:.0f} B)"
    control = extra_peak(N, V, dtype, "control")
    assert control["extra"] > bound, f"control stayed within the bound: {control}"
