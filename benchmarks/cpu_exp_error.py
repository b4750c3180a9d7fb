"""The relative error of the CPU kernels' exp over every float d in [-87.3, 0] (about 1.1e9
values, in chunks), against exp in double: the figures of csrc/cpu/simd.h's comment.

    python benchmarks/cpu_exp_error.py              # every float; about a minute
    PPLFAST_CPU_ISA=avx2 python benchmarks/cpu_exp_error.py --step 7
"""
import argparse

import numpy as np

from pplfast import _C

LOG2E = np.float32(1.44269504088896341)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=1, help="every STEP-th float (default 1)")
    args = parser.parse_args(argv)
    top = int(np.float32(87.3).view(np.int32))
    bounds = (1, 10, 20, 88)
    worst = [0.0] * len(bounds)
    count = 0
    chunk = 1 << 24
    for start in range(0, top + 1, chunk * args.step):
        bits = np.arange(start, min(top + 1, start + chunk * args.step), args.step, dtype=np.int32)
        d = -bits.view(np.float32)
        t = d * LOG2E  # rounded to float32, as the kernels form exponents
        got = np.empty_like(t)
        _C.exp2_clamped(t.ctypes.data, got.ctypes.data, t.size)
        rel = np.abs(got.astype(np.float64) / np.exp(d.astype(np.float64)) - 1.0)
        a = np.abs(d)
        for k, b in enumerate(bounds):
            sel = rel[a <= b]
            if sel.size:
                worst[k] = max(worst[k], float(sel.max()))
        count += d.size
    print(f"{_C.cpu_isa()}: {count} floats in [-87.3, 0]; max relative error "
          + ", ".join(f"|d| <= {b}: {w:.3g}" for b, w in zip(bounds, worst)))


if __name__ == "__main__":
    main()
