"""CPU hidden-states path: extra peak memory stays within the chunk budget, measured in a fresh
process from its own VmHWM (:mod:`memory_harness`), with a live control (the naive logits path) exceeding the bound; the
same for the statistics (``linear_token_stats``), whose running state is O(N * top_k)."""
from __future__ import annotations

import os

import pytest

from memory_harness import in_child, peak_growth

BUDGET_MB = 16
SLACK_MB = 8  # output, O(N) running state, allocator rounding
N, D, V = 2048, 64, 32768  # naive logits alone: N * V * 4 bytes = 256 MiB

def child(mode, dtype, N, D, V, ignore):
    """In the child: the extra peak of one ``mode`` call (``naive``, ``naive_stats``,
    ``stats<top_k>``, ``shift`` or ``pplfast``)."""
    import torch
    import torch.nn.functional as F

    import pplfast

    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    # filled in place: no temporaries larger than the inputs before the baseline is taken
    hidden = torch.empty(N, D, dtype=dtype).normal_()
    weight = torch.empty(V, D, dtype=dtype).normal_(std=D ** -0.5)
    targets = torch.randint(0, V, (N,))
    if ignore:
        targets[::ignore] = -100

    def run(h, w, t):
        if mode == "naive":
            return F.cross_entropy(F.linear(h, w).float(), t, reduction="none")
        if mode == "naive_stats":  # what a user writes today for the statistics
            logp = F.linear(h, w).float().log_softmax(-1)
            return -(logp.exp() * logp).sum(-1) + logp.topk(5, -1).values[:, 0]
        if mode.startswith("stats"):  # "stats<top_k>"
            return pplfast.linear_token_stats(h, w, t, top_k=int(mode[5:]), backend="cpu").entropy
        if mode == "shift":  # (4, N / 4, D): scored by row index, hidden[:, :-1] is not copied
            return pplfast.linear_token_nll(h.view(4, -1, D), w, t.view(4, -1), shift=True,
                                            backend="cpu")
        return pplfast.linear_token_nll(h, w, t, backend="cpu")

    run(hidden[:4], weight[:100], targets[:4].clamp(max=99))  # load libraries, start threads
    # where the kernel refuses a reset, the control still shows the probe is not blind
    out, extra = peak_growth(lambda: run(hidden, weight, targets), strict=False)
    return {"extra": extra, "finite": bool(torch.isfinite(out).all())}


def measure(mode: str, dtype: str, ignore: int = 0) -> dict:
    env = dict(os.environ, PPLFAST_CPU_CHUNK_MB=str(BUDGET_MB))
    return in_child(__file__, "child", env=env, mode=mode, dtype=dtype, N=N, D=D, V=V,
                    ignore=ignore)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_cpu_extra_peak_memory_within_budget():
    bound = (BUDGET_MB + SLACK_MB) << 20
    naive = measure("naive", "float32")
    assert naive["finite"]
    # the control builds N x V logits: it must break the bound, or the measurement is blind
    assert naive["extra"] > 4 * bound, naive
    for mode, dtype, ignore in (("pplfast", "float32", 0), ("pplfast", "bfloat16", 5),
                                ("shift", "bfloat16", 0)):
        ours = measure(mode, dtype, ignore)
        assert ours["finite"]
        assert ours["extra"] <= bound, (
            f"{mode} {dtype}: extra peak {ours['extra'] / 2**20:.1f} MiB > {bound / 2**20:.0f} MiB "
            f"(naive path: {naive['extra'] / 2**20:.0f} MiB)"
        )


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_cpu_linear_token_stats_extra_peak_memory_within_budget():
    bound = (BUDGET_MB + SLACK_MB) << 20
    naive = measure("naive_stats", "float32")
    assert naive["finite"]
    assert naive["extra"] > 4 * bound, naive
    for mode, dtype, ignore in (("stats0", "float32", 0), ("stats5", "bfloat16", 5),
                                ("stats64", "float32", 0)):
        top_k = int(mode[5:])
        # plus the top-k themselves, O(N * top_k): running state, scored rows' and full outputs
        # (an int64 id and a float32 value each)
        bound_k = bound + 3 * N * top_k * (8 + 4)
        ours = measure(mode, dtype, ignore)
        assert ours["finite"]
        assert ours["extra"] <= bound_k, (
            f"{mode} {dtype}: extra peak {ours['extra'] / 2**20:.1f} MiB > "
            f"{bound_k / 2**20:.1f} MiB (naive path: {naive['extra'] / 2**20:.0f} MiB)"
        )
