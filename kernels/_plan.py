"""Launch plans of the Triton kernels: how many programs, over what, with which blocks.

Logits kernels (``token_nll``, ``token_stats``, ``compare``). A program owns one row, or one
chunk of a row's vocabulary: with enough rows (at least 2 x SM count) every program owns a whole
row; with fewer, the vocabulary is cut into ``n_split`` chunks so that about
``SPLIT_PROGRAMS_PER_SM`` programs per SM run (:func:`split_count`), each writing its chunk's
record (``partials.py``) for the op's merge kernel. ``token_nll`` and ``token_stats`` share
:func:`plan`: chunks are whole numbers of blocks and of 16 entries, so that every chunk starts on
its row's 16-byte phase and, past an aligned head, loads unmasked 16-byte vectors.
``compare`` reads two rows per block and masks every block (:func:`compare_plan`).

Fused hidden-states kernels (``linear_token_nll``, ``linear_token_stats``). Programs own a block
of scored rows and a contiguous range of vocabulary tiles (:func:`choose_splits`,
:func:`split_columns`); their tile configurations are per kernel (each file's ``config_for``).

The SM count comes from the caller (the launchers never query the device); CUDA tensors need
it unless the caller fixes the split, and under the interpreter (CPU tensors) a small fixed count
makes small test shapes take the split paths too (:func:`resolve_sm_count`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

# programs per SM the split paths aim for; the SM count assumed under the interpreter by the
# logits kernels, and by the fused kernels (whose splits multiply the tile products that the
# interpreter runs as numpy calls: one SM's worth keeps test shapes fast)
SPLIT_PROGRAMS_PER_SM = 4
INTERPRETER_SM_COUNT = 4
FUSED_INTERPRETER_SM_COUNT = 1

# token_nll / token_stats: (BLOCK_V for 2-byte logits, BLOCK_V for 4-byte logits, num_warps) on
# every GPU (sm_80 to sm_100 alike). 16 entries per thread: token_nll's sm_90 build needs 62
# (bf16) / 45 (fp32) registers, so 4-5 programs share an SM and, with the prefetch, keep
# 64-80 KiB of loads in flight. Larger blocks double the registers and halve that.
LOGITS_CONFIG = (4096, 2048, 8)
# token_stats: the same with 2048-entry blocks for every dtype. The statistics keep five lane
# vectors where token_nll keeps one: with 4096-entry blocks of 2-byte logits they need 128-171
# registers and spill on sm_80 with a softcap (Triton 3.9); with 2048, 64-85 on sm_80 and sm_90.
STATS_CONFIG = (2048, 2048, 8)
# The interpreter runs each program as numpy calls: blocks small enough for tiny test shapes.
LOGITS_INTERPRETER_CONFIG = (1024, 1024, 4)
# split chunks of at least this many entries (GPU, interpreter)
LOGITS_MIN_CHUNK = (2048, 64)
# chunks are whole multiples of their block and of this many entries (every element size's
# 16-byte vector), so that every chunk starts on the same 16-byte phase as its row
CHUNK_ALIGN = 16

# compare: (BLOCK_V, num_warps) on GPUs by HAS_SOFTCAP: two rows in flight per block, so half
# of token_nll's bf16 block. The soft-cap's tanh needs more registers: with 2048 it spills on
# sm_90 under Triton 3.6 (8 bytes at its 128-register cap; 3.9 fits), at 1024 no version spills.
COMPARE_CONFIG = {False: (2048, 8), True: (1024, 8)}
COMPARE_INTERPRETER_CONFIG = (128, 4)
# split chunks of at least (GPU, interpreter) entries, aligned to (GPU, interpreter) entries
COMPARE_MIN_CHUNK = (4096, 64)
COMPARE_CHUNK_ALIGN = (256, 16)


class Plan(NamedTuple):
    """A logits kernel's launch: ``n_split`` chunks of ``chunk`` entries per row (1: one pass),
    blocks of ``block`` entries, ``num_warps`` warps per program."""
    n_split: int
    chunk: int
    block: int
    num_warps: int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def resolve_sm_count(sm_count: Optional[int], on_gpu: bool, fixed_split: bool) -> int:
    """The SM count a launcher plans with: the caller's; required for CUDA tensors unless the
    caller fixes the split (``fixed_split``); :data:`INTERPRETER_SM_COUNT` otherwise."""
    if sm_count is not None:
        return sm_count
    if on_gpu and not fixed_split:
        raise ValueError("sm_count is required for CUDA tensors (or pass num_splits)")
    return INTERPRETER_SM_COUNT


def split_count(rows: int, V: int, sm_count: int, min_chunk: int) -> int:
    """Chunks per row: 1 when rows >= 2 x ``sm_count``; otherwise enough for about
    ``SPLIT_PROGRAMS_PER_SM`` programs per SM, in chunks of at least ``min_chunk`` entries."""
    if rows >= 2 * sm_count:
        return 1
    return max(1, min(cdiv(V, min_chunk), cdiv(SPLIT_PROGRAMS_PER_SM * sm_count, rows)))


def plan(rows: int, V: int, *, on_gpu: bool, dtype: torch.dtype, sm_count: int,
         num_splits: Optional[int] = None, block_v: Optional[int] = None,
         config: tuple = LOGITS_CONFIG) -> Plan:
    """The launch of ``token_nll`` and (with ``config=STATS_CONFIG``) ``token_stats``
    (``n_split = 1``: one-pass kernel).

    The vocabulary is split by :func:`split_count` (or into ``num_splits`` chunks when given).
    A chunk is a whole number of blocks, so that past its aligned head every block but the last
    loads unmasked: the block is the largest power of two (at most the configured one) not above
    a quarter of the even share ``V / n_split``, and the share is rounded up to whole blocks (at
    most a quarter more), which may leave fewer, never empty, chunks.
    """
    block2, block4, warps = config if on_gpu else LOGITS_INTERPRETER_CONFIG
    config_block = block4 if dtype == torch.float32 else block2
    if num_splits is None:
        n_split = split_count(rows, V, sm_count, LOGITS_MIN_CHUNK[0 if on_gpu else 1])
    else:
        n_split = num_splits
    if n_split > 1:
        share = cdiv(V, n_split)
        block = block_v if block_v is not None else min(config_block, _floor_pow2(share // 4))
        chunk = cdiv(share, max(block, CHUNK_ALIGN)) * max(block, CHUNK_ALIGN)
        n_split = cdiv(V, chunk)
    if n_split <= 1:
        n_split, chunk = 1, V
        block = block_v if block_v is not None else config_block
        # a row shorter than the block would leave most lanes masked
        block = min(block, triton.next_power_of_2(max(V, 1)))
    num_warps = max(1, min(warps, block // 256)) if on_gpu else warps
    return Plan(n_split, chunk, block, num_warps)


def compare_plan(rows: int, V: int, *, on_gpu: bool, has_softcap: bool, sm_count: int,
                 num_splits: Optional[int] = None, block_v: Optional[int] = None) -> Plan:
    """The launch of ``compare``: :func:`split_count` chunks (or ``num_splits``) of whole
    alignment units, never empty; blocks of the configured size, at most the chunk's."""
    block, warps = COMPARE_CONFIG[has_softcap] if on_gpu else COMPARE_INTERPRETER_CONFIG
    where = 0 if on_gpu else 1
    if block_v is not None:
        block = block_v
    if num_splits is None:
        n_split = split_count(rows, V, sm_count, COMPARE_MIN_CHUNK[where])
    else:
        n_split = num_splits
    chunk = max(V, 1)
    if n_split > 1:
        align = COMPARE_CHUNK_ALIGN[where]
        chunk = cdiv(cdiv(V, n_split), align) * align
        n_split = cdiv(V, chunk)
    block = min(block, max(16, triton.next_power_of_2(chunk)))
    return Plan(n_split, chunk, block, warps)


def merge_block(n_split: int) -> int:
    """BLOCK_S of a merge kernel: the row's records in one block (at least 2 lanes)."""
    return max(triton.next_power_of_2(n_split), 2)


# ---- fused hidden-states kernels ---------------------------------------------------------------

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) of both fused kernels under the interpreter
FUSED_INTERPRETER_CONFIG = (16, 32, 32, 1, 1)
# Every BLOCK_V of linear_token_nll's autotuning space divides this, so the split ranges do not
# depend on the configuration the autotuner picks.
FUSED_SPLIT_ALIGN = 256
# Records merged per step by the finish kernels: splits <= 2 x SM count, a few steps at most.
FUSED_FINISH_BLOCK_S = 32


def choose_splits(n_rows: int, V: int, block_n: int, block_v: int, sm_count: int) -> int:
    """Vocabulary splits so that about 8 waves of programs run (1 when tokens alone fill them),
    at most 2 x ``sm_count``."""
    token_blocks = cdiv(n_rows, block_n)
    target = 8 * sm_count
    return max(1, min(cdiv(V, block_v), cdiv(target, token_blocks), 2 * sm_count))


def split_columns(V: int, splits: int, align: int) -> tuple:
    """``(splits, cols_per_split)``: ranges of whole ``align`` multiples, none empty."""
    cols = cdiv(cdiv(V, max(1, splits)), align) * align
    return cdiv(V, cols), cols


def finish_block(splits: int) -> int:
    """BLOCK_S of the fused finish kernels."""
    return min(FUSED_FINISH_BLOCK_S, max(2, triton.next_power_of_2(splits)))


def scored_rows(targets: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """int64 indices of the rows whose target is not ``ignore_index``, None when that is every
    row (one host sync: the launchers call it only when the caller did not say)."""
    scored = targets != ignore_index
    return None if bool(scored.all()) else scored.nonzero().squeeze(1)


def launch_rows(targets, ignore_index, rows, all_scored, sm_count, splits, on_gpu):
    """The fused launchers' common start: ``(rows, n, sm_count)``, the scored rows (None: all of
    them), their count, and the SM count (CUDA tensors need it unless the caller fixes
    ``splits``; :data:`FUSED_INTERPRETER_SM_COUNT` under the interpreter)."""
    if sm_count is None:
        if on_gpu and splits is None:
            raise ValueError("sm_count is required for CUDA tensors (or pass splits)")
        sm_count = FUSED_INTERPRETER_SM_COUNT
    if all_scored and rows is not None:
        raise ValueError("pass either rows or all_scored=True, not both")
    if rows is None and not all_scored:
        rows = scored_rows(targets, ignore_index)
    return rows, targets.numel() if rows is None else rows.numel(), sm_count
