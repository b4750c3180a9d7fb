"""score_model on a model whose output layer is split by vocabulary across gloo processes
(docs/vocab_parallel.md): transformers' ``tp_plan="auto"`` (2 ranks: the tiny Llama's heads
divide), and ``parallelize_module`` with ``ColwiseParallel`` on the output layer (2 and 3 ranks,
V = 301: uneven slices; a soft-capped Gemma 2 with the statistics; GPT-2, whose output layer is
tied to its embedding). Each rank scores through the hidden-states ops on its slice (the merge's
exchange runs; no "scored from its logits" fallback) and gets the single-process figures.

The processes start once per world size and run every case in turn.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
import warnings

import pytest
import torch

V = 301
CASES = {  # name -> worlds
    "colwise_llama": (2, 3),
    "colwise_gemma2_stats": (2, 3),
    "colwise_gpt2_tied": (2,),
    "tp_plan_llama": (2,),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- in each rank ---------------------------------------------------------------------------------

def _inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # a shorter document
    return ids, mask


def _check_same(got, want, what):
    from helpers import assert_nll_close

    assert torch.equal(got.scored, want.scored), f"{what}: scored positions differ"
    scale = want.token_nll.double().abs().clamp_min(1.0) * 5  # the GEMMs add up in other orders
    assert_nll_close(got.token_nll, want.token_nll.double(), atol=2e-6 * scale, what=what)
    assert abs(got.perplexity - want.perplexity) <= 1e-5 * want.perplexity, (
        what, got.perplexity, want.perplexity)
    if want.stats is not None:
        for name in ("entropy", "max_logprob", "top_k_logprobs"):
            a, b = getattr(got.stats, name), getattr(want.stats, name)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (what, name)
        for name in ("argmax", "rank", "top_k_ids"):
            assert torch.equal(getattr(got.stats, name), getattr(want.stats, name)), (what, name)


def _scored_split(model, ids, mask, **options):
    """score_model on the split model: no fallback warning, and the merge's exchange ran."""
    import pplfast
    from pplfast import _vocab_merge

    calls = []
    real = _vocab_merge.exchange

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    _vocab_merge.exchange = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "pplfast: scoring ... from its logits" would raise
            result = pplfast.score_model(model, ids, attention_mask=mask, **options)
    finally:
        _vocab_merge.exchange = real
    assert calls, "the vocab-parallel merge never ran"
    return result


def _colwise(kind, world, **options):
    from builders import build_model
    from pplfast.models.parallel import shard_output_layer
    from torch.distributed.device_mesh import init_device_mesh

    import pplfast

    model = build_model(kind, V, context=64)
    ids, mask = _inputs()
    want = pplfast.score_model(model, ids, attention_mask=mask, **options)
    shard_output_layer(model, init_device_mesh("cpu", (world,)))
    weight = model.get_output_embeddings().weight
    assert tuple(weight.to_local().shape) != (V, weight.shape[1]), "the output layer is whole"
    _check_same(_scored_split(model, ids, mask, **options), want, kind)
    return model


def colwise_llama(world, path):
    _colwise("llama", world)


def colwise_gemma2_stats(world, path):
    _colwise("gemma2", world, stats=True, top_k=3)


def colwise_gpt2_tied(world, path):
    model = _colwise("gpt2", world)
    # the embedding stays whole: the tie is broken by the split, not the input layer
    assert model.get_input_embeddings().weight.shape == (V, 32)


def tp_plan_llama(world, path):
    from pplfast.models.loading import load_model
    from pplfast.models.parallel import load_model_tp, tensor_parallel_mesh

    import pplfast

    ids, mask = _inputs()
    whole, _ = load_model(path, device="cpu", dtype=torch.float32, tokenizer=False)
    want = pplfast.score_model(whole, ids, attention_mask=mask)
    mesh, device = tensor_parallel_mesh(world, "cpu")
    model, _ = load_model_tp(path, mesh=mesh, device=device, dtype="float32", tokenizer=False)
    from torch.distributed.tensor import DTensor

    attention = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(attention, DTensor), "not transformers' tensor parallelism"
    _check_same(_scored_split(model, ids, mask), want, "tp_plan")


def _rank(rank, world, port, out, path, names):
    import sys

    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    for name in names:
        torch.manual_seed(0)
        try:
            globals()[name](world, path)
            results[name] = None
        except Exception:
            results[name] = f"rank {rank}: " + traceback.format_exc(limit=-4)[-3000:]
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump(results, f)
        dist.barrier()
    dist.destroy_process_group()


# ---- the tests ------------------------------------------------------------------------------------

_RESULTS = {}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from builders import build_model

    path = tmp_path_factory.mktemp("llama")
    build_model("llama", V, context=64).save_pretrained(path)
    return str(path)


def _outcomes(world, tmp_path_factory, path):
    if world not in _RESULTS:
        names = [n for n, worlds in CASES.items() if world in worlds]
        out = str(tmp_path_factory.mktemp(f"models{world}") / "result")
        torch.multiprocessing.spawn(_rank, args=(world, _free_port(), out, path, names),
                                    nprocs=world)
        results = {}
        for rank in range(world):
            for name, error in json.load(open(f"{out}.rank{rank}.json")).items():
                results.setdefault(name, [])
                if error:
                    results[name].append(error)
        _RESULTS[world] = results
    return _RESULTS[world]


@pytest.mark.parametrize("world, case", [pytest.param(w, n, id=f"P{w}-{n}")
                                         for n, worlds in CASES.items() for w in worlds])
def test_split_output_layer(tmp_path_factory, saved_llama, world, case):
    results = _outcomes(world, tmp_path_factory, saved_llama)
    assert case in results, f"{case} did not run"
    assert not results[case], "\n".join(results[case])
