"""Every entry point of ``pplfast._C`` that takes a number of rows, called directly with 0 rows:
it returns without touching its outputs. (A division by the row count in the column-split rule
killed the process with SIGFPE: the Python wrappers never pass 0 rows, so only a direct call saw
it; the calls therefore run in a fresh process.)"""
from __future__ import annotations

import subprocess
import sys

_CHILD = r"""
import sys
import torch
from pplfast import _C

f32 = lambda n=4: torch.full((n,), 7.0)
f64 = lambda n=4: torch.full((n,), 7.0, dtype=torch.float64)
i64 = lambda n=4: torch.full((n,), 7, dtype=torch.int64)
logits, targets = f32(64), i64()
outs = [f32(), f32(), f32(), i64(), i64(), i64(), f32()]
nstate = f64(4 * _C.NLL_STATE)
sstate = f64(4 * (_C.STATS_STATE + 4))
cstate = f64(4 * _C.COMPARE_STATE)
p = lambda ts: [t.data_ptr() for t in ts]
L, T = logits.data_ptr(), targets.data_ptr()
N, S, C = nstate.data_ptr(), sstate.data_ptr(), cstate.data_ptr()
calls = {
    # rows = 0 and time = 0 each give nothing to do
    "nll_init": lambda: _C.nll_init(N, 0),
    "nll_update": lambda: _C.nll_update(L, _C.FLOAT32, 48, 16, 1, 0, 3, 16, 0, T, -100, 0.0, 1.0,
                                        N, 2),
    "nll_update_t0": lambda: _C.nll_update(L, _C.FLOAT32, 48, 16, 1, 3, 0, 16, 0, T, -100, 0.0,
                                           0.7, N, 2),
    "nll_finish": lambda: _C.nll_finish(N, T, -100, 0, 1.0, outs[0].data_ptr()),
    "stats_init": lambda: _C.stats_init(S, 0, 2, 0),
    "stats_update": lambda: _C.stats_update(L, _C.FLOAT32, 48, 16, 1, 0, 3, 16, 0, T, -100, 0.0,
                                            1.0, 2, S, 2),
    "stats_update_t0": lambda: _C.stats_update(L, _C.BFLOAT16, 48, 16, 1, 3, 0, 16, 0, T, -100,
                                               30.0, 0.5, 0, S, 2),
    "stats_finish": lambda: _C.stats_finish(S, T, -100, 0, 2, 1.0, *p(outs)),
    "compare_init": lambda: _C.compare_init(C, 0),
    "compare_update": lambda: _C.compare_update(L, _C.FLOAT32, 48, 16, 1, L, _C.FLOAT32, 48, 16, 1,
                                                0, 3, 16, 0, T, -100, 0.0, 1.0, C, 2),
    "compare_update_t0": lambda: _C.compare_update(L, _C.FLOAT32, 48, 16, 1, L, _C.FLOAT32, 48,
                                                   16, 1, 0, 0, 16, 0, T, -100, 0.0, 1.0, C, 2),
    "compare_finish": lambda: _C.compare_finish(C, T, -100, 0, 1.0, *p(outs[:4]), *p(outs[4:6])),
}
for name in sys.argv[1:]:
    print(name, flush=True)  # the last name printed is the call that killed the process
    calls[name]()
    untouched = all(bool((t == 7).all()) for t in [*outs, nstate, sstate, cstate, logits, targets])
    print("untouched" if untouched else "written", flush=True)
"""

ENTRY_POINTS = ["nll_init", "nll_update", "nll_update_t0", "nll_finish", "stats_init",
                "stats_update", "stats_update_t0", "stats_finish", "compare_init",
                "compare_update", "compare_update_t0", "compare_finish"]


def test_zero_rows_direct_call():
    """One fresh process calls every entry point in turn (a signal ends it: the output names the
    call)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, *ENTRY_POINTS], capture_output=True,
                          text=True, timeout=120)
    lines = proc.stdout.split()
    how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
           else f"exit code {proc.returncode}")
    assert proc.returncode == 0, (
        f"_C {lines[-1] if lines else '?'} with 0 rows: {how}\n{proc.stderr[-2000:]}")
    assert lines == [w for name in ENTRY_POINTS for w in (name, "untouched")], proc.stdout
