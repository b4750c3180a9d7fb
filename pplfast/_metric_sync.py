"""The collectives of the streaming metrics (``pplfast.metric``): one all-reduce of float64
sums, one all-gather of per-token values of any length per rank, and which rank adds a row's
state when the vocabulary is split across ranks (docs/vocab_parallel.md: under tensor x data
parallelism every rank of a vocabulary group holds the same rows, and only the first adds).
"""
from __future__ import annotations

import torch

__all__ = ["all_gather_rows", "all_reduce_sums", "counts_here", "noted_group",
           "process_group_device"]


def process_group_device(group):
    """The device collectives of ``group`` run on (CPU for gloo, the current GPU for NCCL);
    an error naming the fix when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync() needs an initialised torch.distributed process group")
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(sums: torch.Tensor, group=None) -> torch.Tensor:
    """The float64 ``sums`` added over every rank of ``group`` (a copy, on the CPU)."""
    import torch.distributed as dist

    total = sums.to(process_group_device(group), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.cpu()


def all_gather_rows(values: torch.Tensor, group=None) -> torch.Tensor:
    """``(k, n_rank)`` float32 values of every rank of ``group``, concatenated along the second
    axis in rank order (the ranks may hold different ``n``), on the CPU."""
    import torch.distributed as dist

    device = process_group_device(group)
    local = values.to(device)
    world = dist.get_world_size(group)
    length = torch.tensor([local.shape[1]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(x) for x in lengths)
    padded = torch.zeros(local.shape[0], longest, dtype=local.dtype, device=device)
    padded[:, : local.shape[1]] = local
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:, : int(k)] for g, k in zip(gathered, lengths)], dim=1).cpu()


def counts_here(group=None, vocab_group_=None) -> bool:
    """Whether this rank adds its state in a sync over ``group``: always without a vocabulary
    group; with one, only if it is the lowest global rank among the ranks that ``group`` and
    the vocabulary group share (they all hold the same rows and the same sums)."""
    if vocab_group_ is None:
        return True
    import torch.distributed as dist

    process_group_device(group)  # the error naming the fix when nothing is initialised
    world = dist.group.WORLD
    synced = set(dist.get_process_group_ranks(world if group is None else group))
    shared = synced & set(dist.get_process_group_ranks(vocab_group_))
    return dist.get_rank() == min(shared)


def noted_group(current, group):
    """The vocabulary group of a metric's updates: the first one seen; a second, different one
    is refused."""
    if group is None or current is None or group is current:
        return current if group is None else group
    raise ValueError("this metric's updates split the vocabulary over different process groups: "
                     "use one metric per vocabulary group")
