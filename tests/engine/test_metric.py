"""Streaming Perplexity: batches, shards and processes add up to the one-shot float64 figures."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import pplfast
from pplfast import Perplexity, reference
from helpers import assert_nll_close, row_lse


def make_batches(num_batches=3, V=507, shapes=((2, 9), (1, 17), (3, 5))):
    batches = []
    for b in range(num_batches):
        B, T = shapes[b % len(shapes)]
        logits = torch.randn(B, T, V) * 3
        targets = torch.randint(0, V, (B, T))
        targets[torch.rand(B, T) < 0.2] = -100
        batches.append((logits, targets))
    return batches


def expected_figures(batches, shift=False):
    """One-shot float64 figures from the reference NLL; stderr as llama.cpp computes it."""
    values = []
    for logits, targets in batches:
        nll = reference.token_nll(logits, targets, shift=shift)
        t = targets[..., 1:] if shift else targets
        values.append(nll[t != -100])
    x = torch.cat(values)
    n = x.numel()
    mean = x.mean().item()
    stderr = x.std(unbiased=True).item() / math.sqrt(n)
    return n, x.sum().item(), mean, stderr


def check_result(res, n, total, mean, stderr, rtol=1e-6):
    assert res.num_tokens == n
    assert res.sum_nll == pytest.approx(total, rel=rtol)
    assert res.mean_nll == pytest.approx(mean, rel=rtol)
    assert res.perplexity == pytest.approx(math.exp(mean), rel=rtol)
    assert res.bits_per_token == pytest.approx(mean / math.log(2), rel=rtol)
    assert res.mean_nll_stderr == pytest.approx(stderr, rel=1e-4)
    assert res.perplexity_stderr == pytest.approx(math.exp(mean) * stderr, rel=1e-4)


@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
def test_update_over_batches_equals_one_shot(shift):
    batches = make_batches()
    metric = Perplexity()
    for logits, targets in batches:
        nll = metric.update(logits, targets, shift=shift)
        assert_nll_close(nll, reference.token_nll(logits, targets, shift=shift),
                         row_lse(logits, shift=shift))
    check_result(metric.compute(), *expected_figures(batches, shift))
    assert metric.compute().bits_per_byte is None and metric.compute().word_perplexity is None


def test_update_linear_with_options_equals_logits_path():
    V, D = 507, 123
    hidden = torch.randn(2, 11, D)
    weight = torch.randn(V, D) / D ** 0.5 * 4
    bias = torch.randn(V)
    targets = torch.randint(0, V, (2, 11))
    opts = dict(shift=True, softcap=3.0, temperature=0.7)
    a, b = Perplexity(), Perplexity()
    a.update_linear(hidden, weight, targets, bias=bias, **opts)
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
    ref = reference.token_nll(logits, targets, **opts)
    b.update_nll(ref.float())
    ra, rb = a.compute(), b.compute()
    assert ra.num_tokens == rb.num_tokens == 20
    assert ra.mean_nll == pytest.approx(rb.mean_nll, rel=2e-6)


def test_bytes_and_words_are_ratios_of_sums():
    batches = make_batches()
    byte_counts, word_counts = [(40, 3), 77, torch.tensor([5])], [7, (11, 2), 1]
    metric = Perplexity()
    for (logits, targets), nb, nw in zip(batches, byte_counts, word_counts):
        metric.update(logits, targets, num_bytes=nb, num_words=nw)
    n, total, mean, stderr = expected_figures(batches)
    res = metric.compute()
    check_result(res, n, total, mean, stderr)
    assert res.num_bytes == 125 and res.num_words == 21
    assert res.bits_per_byte == pytest.approx(total / 125 / math.log(2), rel=1e-6)
    assert res.byte_perplexity == pytest.approx(math.exp(total / 125), rel=1e-6)
    assert res.word_perplexity == pytest.approx(math.exp(total / 21), rel=1e-6)
    # one batch without byte counts: a ratio over bytes would be wrong, so none is given
    logits, targets = batches[0]
    metric.update(logits, targets, num_words=3)
    res = metric.compute()
    assert res.bits_per_byte is None and res.byte_perplexity is None
    assert res.word_perplexity is not None


def test_merge_reset_and_empty():
    batches = make_batches(4)
    whole, left, right = Perplexity(), Perplexity(), Perplexity()
    for i, (logits, targets) in enumerate(batches):
        whole.update(logits, targets, num_bytes=10 + i)
        (left if i % 2 else right).update(logits, targets, num_bytes=10 + i)
    merged = left.merge(right).compute()
    expected = whole.compute()
    assert merged.num_tokens == expected.num_tokens and merged.num_bytes == expected.num_bytes
    assert merged.mean_nll == pytest.approx(expected.mean_nll, rel=1e-12)
    assert merged.perplexity_stderr == pytest.approx(expected.perplexity_stderr, rel=1e-9)
    whole.reset()
    with pytest.raises(ValueError, match="no scored tokens"):
        whole.compute()
    only_ignored = Perplexity()
    only_ignored.update(torch.randn(3, 8), torch.full((3,), -100))
    with pytest.raises(ValueError, match="no scored tokens"):
        only_ignored.compute()
    with pytest.raises(ValueError, match="num_bytes"):
        Perplexity().update(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), num_bytes=-1)
    with pytest.raises(TypeError, match="num_words must be a count.*got object"):
        Perplexity().update(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), num_words=object())


def test_nan_and_single_token():
    metric = Perplexity()
    metric.update_nll(torch.tensor([1.5]))
    res = metric.compute()
    assert res.perplexity == pytest.approx(math.exp(1.5)) and math.isnan(res.perplexity_stderr)
    metric.update_nll(torch.tensor([float("nan"), 2.0]), torch.tensor([True, False]))
    assert math.isnan(metric.compute().perplexity)


def _sync_worker(rank, world, init_file, out_dir, batches, stats=False):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metric = Perplexity()
        for i, (logits, targets) in enumerate(batches):
            if i % world == rank:
                metric.update(logits, targets, num_bytes=3 + i, num_words=1 + i, stats=stats)
        local = metric.compute().num_tokens
        metric.sync()
        metric.sync()  # idempotent: the local sums are kept
        torch.save({"synced": metric.compute().as_dict(), "local": local},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stats", [False, True], ids=["nll", "stats"])
def test_sync_over_two_gloo_processes(tmp_path, stats):
    batches = make_batches(5)
    single = Perplexity()
    for i, (logits, targets) in enumerate(batches):
        single.update(logits, targets, num_bytes=3 + i, num_words=1 + i, stats=stats)
    expected = single.compute().as_dict()
    assert (expected["mean_entropy"] is not None) == stats
    # spawn, not fork: a forked child can deadlock on the parent's OpenMP thread pool
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path), batches, stats),
             nprocs=2)
    locals_ = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        locals_.append(got["local"])
        for key, value in expected.items():
            if isinstance(value, float):
                assert got["synced"][key] == pytest.approx(value, rel=1e-12), key
            else:
                assert got["synced"][key] == value, key
    assert 0 < locals_[0] < expected["num_tokens"] and sum(locals_) == expected["num_tokens"]


def test_metric_stats_fields_merge():
    """``stats=True``: mean entropy and top-1 accuracy over the scored tokens, against float64;
    merged halves (one through ``update_linear``) give the same figures; without statistics
    both are None."""
    V = 50
    logits = torch.randn(2, 9, V)
    ids = torch.randint(0, V, (2, 9))
    ids[:, 1::2] = logits[:, :-1:2].argmax(-1)  # about half the tokens are the model's guess
    ids[0, 3] = -100
    whole = Perplexity()
    out = whole.update(logits, ids, shift=True, stats=True)
    assert isinstance(out, pplfast.TokenStats)
    result = whole.compute()
    z = logits[:, :-1].double()
    t = ids[:, 1:]
    scored = t != -100
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert result.mean_entropy == pytest.approx(entropy[scored].mean().item(), rel=1e-6)
    top1 = (z.argmax(-1) == t)[scored].double().mean().item()
    assert 0.3 < top1 < 0.9
    assert result.top1_accuracy == pytest.approx(top1, abs=1e-12)
    # two halves merged give the same figures; the linear update adds the same way
    a, b = Perplexity(), Perplexity()
    a.update(logits[:1], ids[:1], shift=True, stats=True)
    b.update_linear(logits[1:], torch.eye(V), ids[1:], shift=True, stats=True)
    merged = a.merge(b).compute()
    assert merged.mean_entropy == pytest.approx(result.mean_entropy, rel=1e-6)
    assert merged.top1_accuracy == pytest.approx(result.top1_accuracy, abs=1e-12)
    plain = Perplexity()
    plain.update(logits, ids, shift=True)
    assert plain.compute().mean_entropy is None and plain.compute().top1_accuracy is None


def test_safe_exp_is_the_one_exp_of_every_figure():
    """exp of a mean NLL past exp's range is inf, never an OverflowError, for floats and arrays,
    and every figure of the package goes through it (no other math.exp / np.exp)."""
    import pathlib
    import re
    import warnings

    import numpy as np

    from pplfast.metric import safe_exp

    assert safe_exp(1000.0) == math.inf and safe_exp(-1000.0) == 0.0
    assert safe_exp(1.5) == math.exp(1.5) and math.isnan(safe_exp(math.nan))
    assert safe_exp(math.inf) == math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in exp" is not printed
        got = safe_exp(np.array([1.5, 1000.0, np.nan, -np.inf]))
    assert got.dtype == np.float64 and got[0] == math.exp(1.5) and got[1] == math.inf
    assert math.isnan(got[2]) and got[3] == 0.0
    res = Perplexity()
    res.update_nll(torch.tensor([900.0, 800.0]), num_bytes=1, num_words=1)
    figures = res.compute()
    assert figures.perplexity == figures.byte_perplexity == figures.word_perplexity == math.inf
    package = pathlib.Path(pplfast.__file__).parent
    home = package / "_summary.py"  # safe_exp's own module (pplfast.metric re-exports it)
    bare = [f"{path.name}:{n}" for path in sorted(package.rglob("*.py")) if path != home
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"\b(math|np|numpy)\.exp\(", line)]
    assert bare == []
