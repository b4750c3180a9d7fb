"""Vocab-parallel scoring: the vocabulary split across the ranks of a process group.

A tensor-parallel output layer (Megatron's ``ColumnParallelLinear``, PyTorch's ``ColwiseParallel``,
transformers' ``tp_plan="auto"``) leaves each rank with ``logits[..., start:stop]`` or the rows
``weight[start:stop]``. :class:`VocabShard` names that slice and its process group; passed as
``vocab_shard=`` to any op (``token_nll``, ``perplexity``, ``token_stats``, ``compare`` and their
``linear_*`` forms), it makes the op score the rows on every rank of the group without gathering
the logits: each rank reduces its slice to a few float32 numbers per row, one ``all_gather``
exchanges them, and the same float64 merge runs on every rank (``pplfast._vocab_merge``;
docs/vocab_parallel.md). A ``DTensor`` sharded on the vocabulary dimension on one mesh dimension
(logits ``Shard(-1)``, weight ``Shard(0)``) carries its slice and group itself: the ops take it
without ``vocab_shard=`` (:func:`unwrap`), as ``torch.distributed.tensor.parallel.loss_parallel``
reads its input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = ["VocabShard"]


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_shard needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or a launch by torchrun)")
    return dist


def _index(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"VocabShard {name} must be an int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, stop)`` of the vocabulary, and the process group whose ranks
    hold the other slices (None: the default group).

    The slices of the group's ranks must tile ``[0, V)`` in vocabulary order (in any rank order;
    a slice may be empty); this is checked on every call, on every rank, from what the call's one
    collective carries. ``vocab_size`` (optional; :meth:`from_vocab` sets it) lets the target
    range be checked before any kernel runs; without it the targets are checked against the
    ``V`` the slices add up to, after the collective.
    """

    start: int
    stop: int
    group: Any = None
    vocab_size: Optional[int] = None

    def __post_init__(self):
        start, stop = _index("start", self.start), _index("stop", self.stop)
        if not 0 <= start <= stop:
            raise ValueError(f"VocabShard needs 0 <= start <= stop, got start={self.start!r}, "
                             f"stop={self.stop!r}")
        if self.vocab_size is not None:
            size = _index("vocab_size", self.vocab_size)
            if size < stop:
                raise ValueError(f"VocabShard vocab_size={size} is below stop={stop}")

    @classmethod
    def from_vocab(cls, vocab_size: int, group=None) -> "VocabShard":
        """This rank's slice of a vocabulary of ``vocab_size`` split over ``group``: ``V / P``
        entries per rank in rank order when ``P`` divides ``V`` (Megatron's split); otherwise
        ``ceil(V / P)`` per rank, the last ones smaller or empty (``torch.chunk``'s split, which
        is how a ``DTensor`` with ``Shard(-1)`` lays it out)."""
        vocab_size = _index("vocab_size", vocab_size)
        if vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
        dist = _dist()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError("VocabShard.from_vocab: this process is not a member of group")
        step = -(-vocab_size // world)
        start = min(rank * step, vocab_size)
        return cls(start, min(start + step, vocab_size), group, vocab_size)

    @property
    def size(self) -> int:
        """Entries of the vocabulary on this rank: ``stop - start``."""
        return self.stop - self.start

    def group_name(self) -> str:
        """The registered name of the group (what the custom ops carry)."""
        dist = _dist()
        group = self.group if self.group is not None else dist.group.WORLD
        return group.group_name


class Sharded(NamedTuple):
    """A call's vocabulary slice as the custom ops take it: ``[start, stop, vocab_size or -1]``
    and the group's name."""

    bounds: List[int]
    group: str


def op_args(shard: Optional[VocabShard]) -> Tuple[Optional[List[int]], str]:
    """``(bounds, group name)`` for the custom ops; ``(None, "")`` without a shard."""
    if shard is None:
        return None, ""
    size = -1 if shard.vocab_size is None else int(shard.vocab_size)
    return [int(shard.start), int(shard.stop), size], shard.group_name()


def process_group(name: str):
    """The process group registered under ``name``."""
    from torch.distributed import distributed_c10d

    _dist()
    return distributed_c10d._resolve_process_group(name)


# ---- DTensor inputs --------------------------------------------------------------------------

def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor
        return False
    return isinstance(x, DTensor)


def _vocab_mesh_dim(name: str, x, dim: int) -> Optional[int]:
    """The mesh dimension of DTensor ``x`` that shards tensor dimension ``dim`` (None if none);
    the others must be ``Replicate`` or shard a leading dimension (loss_parallel's rule)."""
    from torch.distributed.tensor import Partial, Shard

    found = None
    for mesh_dim, placement in enumerate(x.placements):
        if isinstance(placement, Partial):
            raise ValueError(f"{name} is a DTensor with a Partial placement on mesh dimension "
                             f"{mesh_dim}: reduce it first (redistribute to Replicate or Shard)")
        if isinstance(placement, Shard):
            d = placement.dim % x.ndim
            if d == dim:
                if found is not None:
                    raise ValueError(f"{name} is a DTensor sharded on its vocabulary dimension "
                                     f"by mesh dimensions {found} and {mesh_dim}: pplfast takes "
                                     "it sharded over one mesh dimension")
                found = mesh_dim
            elif dim == 0 or d > dim:
                raise ValueError(f"{name} is a DTensor sharded on dimension {d} "
                                 f"({x.placements}): only leading (batch) dimensions may be "
                                 "sharded besides the vocabulary")
    return found


def _shard_of(name: str, x, dim: int) -> Optional[VocabShard]:
    mesh_dim = _vocab_mesh_dim(name, x, dim)
    if mesh_dim is None:
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh,
                                                                x.placements)
    start = int(offset[dim])
    return VocabShard(start, start + int(local_shape[dim]), x.device_mesh.get_group(mesh_dim),
                      int(x.shape[dim]))


def local(x):
    """A DTensor's local tensor; anything else as it is."""
    return x.to_local() if _is_dtensor(x) else x


def _same_sharding(names: Sequence[str], xs: Sequence) -> None:
    first = xs[0]
    for name, x in zip(names[1:], xs[1:]):
        if not _is_dtensor(x) or x.device_mesh != first.device_mesh or \
                tuple(x.placements) != tuple(first.placements):
            raise ValueError(f"{names[0]} is a DTensor with placements {first.placements}: "
                             f"{name} must be one with the same mesh and placements")


def unwrap(kind: str, names: Sequence[str], tensors: Sequence, targets, extras: Sequence = (),
           vocab_shard: Optional[VocabShard] = None):
    """``(local tensors, local targets, local extras, shard)`` of one call.

    ``kind`` "logits": ``tensors`` are the logits of each model (vocabulary last); "linear":
    ``tensors`` are ``(hidden, weight)`` pairs flattened (weight vocabulary first), ``extras``
    the biases. A DTensor sharded on the vocabulary gives the shard (its group from its mesh, as
    ``loss_parallel`` derives it); other DTensors (replicated, or sharded on a batch dimension)
    and the targets give their local tensors. Plain tensors pass through with ``vocab_shard``.
    """
    if vocab_shard is not None and not isinstance(vocab_shard, VocabShard):
        raise TypeError(f"vocab_shard must be a pplfast.VocabShard or None, got "
                        f"{type(vocab_shard).__name__}")
    if not any(_is_dtensor(x) for x in (*tensors, targets, *extras)):
        return list(tensors), targets, list(extras), vocab_shard
    if kind == "logits":
        vocab = [(n, x, x.ndim - 1) for n, x in zip(names, tensors) if _is_dtensor(x)]
    else:  # the weights, every second tensor
        vocab = [(n, x, 0) for n, x in list(zip(names, tensors))[1::2] if _is_dtensor(x)]
    if kind == "linear":  # the hidden states: never split along their width
        for n, x in list(zip(names, tensors))[0::2]:
            if _is_dtensor(x) and _vocab_mesh_dim(n, x, x.ndim - 1) is not None:
                raise ValueError(f"{n} is a DTensor sharded on its last (hidden) dimension: "
                                 "pass the full hidden states on every rank")
    shards = [_shard_of(n, x, d) for n, x, d in vocab]
    shard = next((s for s in shards if s is not None), None)
    if shard is not None:
        if vocab_shard is not None:
            raise ValueError(f"{vocab[0][0]} is a DTensor sharded on the vocabulary, which names "
                             "its slice and group: pass vocab_shard=None")
        expected = names if kind == "logits" else list(names)[1::2]
        if len(vocab) != len(expected) or any(s is None for s in shards):
            raise ValueError(f"{vocab[0][0]} is sharded on the vocabulary: every "
                             f"{'logits' if kind == 'logits' else 'weight'} tensor of the call "
                             "must be a DTensor sharded the same way")
        _same_sharding([n for n, _, _ in vocab], [x for _, x, _ in vocab])
        vocab_shard = shard
    return ([local(x) for x in tensors], local(targets),
            [None if b is None else local(b) for b in extras], vocab_shard)


def full(x):
    """A DTensor gathered whole on every rank (for a probe's few rows); anything else as it is."""
    return x.full_tensor() if _is_dtensor(x) else x


def linear_rows(hidden: torch.Tensor, weight, bias=None) -> torch.Tensor:
    """``F.linear(hidden, weight, bias)`` where the output layer may be a DTensor sharded on the
    vocabulary (its rows): each rank multiplies its rows and the logits are gathered whole. For
    the few rows of a probe, never for scoring (the ops take the sharded layer as it is)."""
    if not _is_dtensor(weight):
        return torch.nn.functional.linear(hidden, weight, bias)
    from torch.distributed.tensor import DTensor, Shard

    z = torch.nn.functional.linear(hidden, weight.to_local(), None if bias is None else local(bias))
    placements = [Shard(z.ndim - 1) if isinstance(p, Shard) and p.dim % weight.ndim == 0 else p
                  for p in weight.placements]
    shape = (*z.shape[:-1], weight.shape[0])  # uneven slices: the global shape, given
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(z, weight.device_mesh, placements, shape=shape,
                              stride=stride).full_tensor()


def vocab_group(tensor, vocab_shard: Optional[VocabShard], dim: int):
    """The process group over which a call splits the vocabulary: the group of ``vocab_shard``,
    or of ``tensor`` when it is a DTensor sharded on its dimension ``dim`` (-1 for logits, 0 for
    an output layer's weight); None for a call on one process."""
    if vocab_shard is not None:
        return _dist().group.WORLD if vocab_shard.group is None else vocab_shard.group
    if _is_dtensor(tensor) and tensor.ndim:
        mesh_dim = _vocab_mesh_dim("tensor", tensor, dim % tensor.ndim)
        if mesh_dim is not None:
            return tensor.device_mesh.get_group(mesh_dim)
    return None


def check_local_width(name: str, width: int, shard: VocabShard) -> None:
    """The local vocabulary width of ``name`` is the shard's."""
    if width != shard.size:
        raise ValueError(f"{name} holds {width} vocabulary entries but vocab_shard is "
                         f"[{shard.start}, {shard.stop}) ({shard.size} entries)")


def chunk_bounds(vocab_size: int, parts: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` of each of ``parts`` slices of ``vocab_size`` as :meth:`VocabShard.
    from_vocab` splits it (for tests and benchmarks that lay out shards by hand)."""
    step = math.ceil(vocab_size / parts) if parts else 0
    return [(min(r * step, vocab_size), min(r * step + step, vocab_size)) for r in range(parts)]
