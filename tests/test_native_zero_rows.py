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
state = [f32(), f64(), f64(), f32(), i64(), i64(), f64(), f32(), i64()]
cstate = f64(4 * _C.COMPARE_STATE)
p = lambda ts: [t.data_ptr() for t in ts]
L, T = logits.data_ptr(), targets.data_ptr()
calls = {
    # batch = 0 and time = 0 each give 0 rows
    "token_nll_b0": lambda: _C.token_nll(L, _C.FLOAT32, 0, 3, 16, 48, 16, 1, T, -100, 0.0, 1.0,
                                         outs[0].data_ptr(), 2),
    "token_nll_t0": lambda: _C.token_nll(L, _C.FLOAT32, 3, 0, 16, 48, 16, 1, T, -100, 0.0, 0.7,
                                         outs[0].data_ptr(), 2),
    "lse_update": lambda: _C.lse_update(L, _C.FLOAT32, 0, 16, 16, 1, 0, T, -100, 0.0, 1.0,
                                        *p(state[:2]), state[2].data_ptr(), 2),
    "lse_finish": lambda: _C.lse_finish(*p(state[:3]), T, -100, 0, 1.0, outs[0].data_ptr()),
    "token_stats_b0": lambda: _C.token_stats(L, _C.FLOAT32, 0, 3, 16, 48, 16, 1, T, -100, 0.0,
                                             1.0, 2, *p(outs), 2),
    "token_stats_t0": lambda: _C.token_stats(L, _C.BFLOAT16, 3, 0, 16, 48, 16, 1, T, -100, 30.0,
                                             0.5, 0, *p(outs), 2),
    "stats_update": lambda: _C.stats_update(L, _C.FLOAT32, 0, 16, 16, 1, 0, T, -100, 0.0, 1.0,
                                            outs[0].data_ptr(), 2, *p(state), 2),
    "stats_finish": lambda: _C.stats_finish(*p(state[:3]), state[4].data_ptr(),
                                            state[5].data_ptr(), state[6].data_ptr(), T, -100, 0,
                                            2, 1.0, *p(outs)),
    "compare_init": lambda: _C.compare_init(cstate.data_ptr(), 0),
    "compare_update": lambda: _C.compare_update(L, _C.FLOAT32, 48, 16, 1, L, _C.FLOAT32, 48, 16, 1,
                                                0, 3, 16, 0, T, -100, 0.0, 1.0,
                                                cstate.data_ptr(), 2),
    "compare_update_t0": lambda: _C.compare_update(L, _C.FLOAT32, 48, 16, 1, L, _C.FLOAT32, 48,
                                                   16, 1, 0, 0, 16, 0, T, -100, 0.0, 1.0,
                                                   cstate.data_ptr(), 2),
    "compare_finish": lambda: _C.compare_finish(cstate.data_ptr(), T, -100, 0, 1.0,
                                                *p(outs[:4]), *p(outs[4:6])),
}
for name in sys.argv[1:]:
    print(name, flush=True)  # the last name printed is the call that killed the process
    calls[name]()
    untouched = all(bool((t == 7).all()) for t in [*outs, *state, cstate, logits, targets])
    print("untouched" if untouched else "written", flush=True)
"""

ENTRY_POINTS = ["token_nll_b0", "token_nll_t0", "lse_update", "lse_finish", "token_stats_b0",
                "token_stats_t0", "stats_update", "stats_finish", "compare_init",
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
