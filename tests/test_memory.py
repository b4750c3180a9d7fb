"""No N×V temporary on CPU: extra peak memory of one call, measured in a fresh process.

The child resets its peak-RSS counter (``/proc/self/clear_refs``), reads ``VmHWM`` before and
after the measured call, and reports the difference. ``ru_maxrss`` is not used: a child can
inherit its parent's high-water mark. The live control (``F.cross_entropy``, which builds the
log-softmax) must exceed the same bound, so the test can fail.
"""
import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import torch.nn.functional as F
    import pplfast

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    N, V, dtype, which = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
    logits = torch.randn(N, V).to(dtype)
    targets = torch.randint(0, V, (N,))
    run = {
        "pplfast": lambda: pplfast.token_nll(logits, targets, backend="cpu"),
        "control": lambda: F.cross_entropy(logits, targets, reduction="none"),
    }[which]
    pplfast.token_nll(logits[:2], targets[:2], backend="cpu")  # load the extension first
    reset_peak()
    before = status("VmHWM")
    out = run()
    after = status("VmHWM")
    print(json.dumps({"extra": after - before, "logits_bytes": logits.numel() * logits.element_size(),
                      "finite": bool(torch.isfinite(out).all())}))
    """
)


def extra_peak(N, V, dtype, which):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(N), str(V), dtype, which],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_nll_has_no_vocabulary_sized_temporary(dtype):
    N, V = 512, 128256
    ours = extra_peak(N, V, dtype, "pplfast")
    bound = 0.01 * ours["logits_bytes"]
    assert ours["finite"]
    assert ours["extra"] <= bound, f"extra peak {ours['extra']} B > 1% of logits ({bound:.0f} B)"
    control = extra_peak(N, V, dtype, "control")
    assert control["extra"] > bound, f"control stayed within the bound: {control}"
