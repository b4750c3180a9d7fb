"""A causal LM split across the ranks of a torchrun job, its output layer by vocabulary: what
``pplfast score --tp N`` loads. The hidden-states ops take the split output layer as it is (a
``DTensor`` sharded ``Shard(0)``: ``pplfast.vocab_parallel``), so no rank ever holds the logits of
the whole vocabulary (docs/vocab_parallel.md).

Two ways, tried in turn: transformers' own tensor parallelism (``tp_plan="auto"``: attention and
MLP split too, on CPU with gloo as on GPUs with NCCL), where the model has a plan that this
number of ranks divides; otherwise the whole model on every rank with only its output layer split
(``parallelize_module`` with ``ColwiseParallel``, logits sharded ``Shard(-1)``).
"""
from __future__ import annotations

import os
import warnings

import torch

from .loading import (ModelLoadError, _transformers, first_line, load_model, load_tokenizer,
                      parse_device, torch_dtype)

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def tensor_parallel_mesh(tp: int, device=None):
    """The 1-D device mesh of ``tp`` ranks: this torchrun job's processes, its process group
    started here (gloo for CPU tensors, NCCL for CUDA ones) unless it already is. ValueError
    naming the fix when the process was not started by torchrun or ``tp`` is not its size."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp must be a positive int, got {tp!r}")
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ValueError(f"--tp {tp} runs in the {tp} processes of a torchrun job: torchrun "
                         f"--nproc-per-node {tp} -m pplfast score ... --tp {tp} (no "
                         f"{', '.join(missing)} in the environment)")
    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise ValueError(f"--tp {tp} needs {tp} processes, torchrun started {world}: pass "
                         f"--nproc-per-node {tp}")
    device = parse_device(device, option="--device")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return init_device_mesh(device.type, (tp,)), device


def _vocab_split(model) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(layer, "weight", None)
    return isinstance(weight, DTensor) and any(isinstance(p, Shard) and p.dim == 0
                                               for p in weight.placements)


def _with_tp_plan(name, mesh, dtype):
    """transformers' tensor parallelism, or None where it does not apply to this model."""
    transformers = _transformers("loading a model by name")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notes of the tp_plan argument
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, tp_plan="auto", device_mesh=mesh, **{dtype_kw: dtype})
    except Exception:  # no plan, heads this size does not divide, an old transformers, ...
        return None
    return model.eval() if _vocab_split(model) else None


def shard_output_layer(model, mesh) -> None:
    """Split ``model``'s output layer by vocabulary over ``mesh`` (``ColwiseParallel``: its
    weight ``Shard(0)``, its logits ``Shard(-1)``); the rest of the model stays whole."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    layer = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is layer)
    parallelize_module(model, mesh, {name: ColwiseParallel(output_layouts=Shard(-1),
                                                           use_local_output=False)})


def load_model_tp(name, *, mesh, device, dtype="auto", tokenizer: bool = True):
    """``(model, tokenizer or None)``: the model split over ``mesh`` (module notes) on
    ``device``, or :class:`ModelLoadError`."""
    model = _with_tp_plan(name, mesh, torch_dtype(dtype, device))
    if model is not None:
        return model, load_tokenizer(name) if tokenizer else None
    model, tok = load_model(name, device=device, dtype=dtype, tokenizer=tokenizer)
    try:
        shard_output_layer(model, mesh)
    except Exception as exc:
        raise ModelLoadError(f"cannot split the output layer of {str(name)!r} over "
                             f"{mesh.size()} ranks: {first_line(exc)}") from None
    return model, tok
