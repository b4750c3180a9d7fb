"""``pplfast bench``: time pplfast against its peers on this machine and print one table.

Method (benchmarks/README.md): every figure is measured side by side in one run and
reported as a ratio to a baseline from the same run, with the machine, versions, command and
timestamp.

- Logits path: ``pplfast.token_nll`` vs ``F.cross_entropy(reduction="none")`` and
  ``-F.log_softmax(logits, -1).gather(-1, targets[:, None])`` (and Liger's cross entropy on GPU,
  when installed). Effective GB/s = bytes of logits / time; the fraction is taken of the
  machine's read bandwidth measured in the same run (CPU: ``torch.sum`` over a large float32
  buffer; GPU: a device-to-device copy, counting bytes read + written).
- Compare path (``--path compare``): ``pplfast.compare`` of two logits tensors vs the PyTorch
  expression (``log_softmax`` of both, ``F.kl_div(..., log_target=True, reduction="none")
  .sum(-1)``, both argmaxes), next to ``pplfast.token_nll`` of one of the two tensors. GB/s counts
  the bytes of both tensors.
- Hidden-states path (``--path linear``): ``pplfast.linear_token_nll`` vs ``F.linear`` +
  ``F.cross_entropy``, ``F.linear_cross_entropy`` with chunking options (PyTorch >= 2.13) and, on
  GPU, Cut Cross-Entropy and Liger's fused linear cross entropy (forward only). TFLOP/s =
  2*N*D*V / time, next to the rate of a plain ``hidden @ weight.T`` of the same shape. On a GPU
  also ``pplfast[triton-fused-fp32]``: the fused Triton kernel with IEEE float32 products, which
  pplfast's routing does not take for float32 without TF32 (it takes the chunked cuBLAS path);
  its float32 rows decide that rule (``pplfast._triton``).
- Statistics path (``--path stats``): ``pplfast.token_stats`` with ``top_k`` 0 and 5, next to
  ``pplfast.token_nll``, vs the PyTorch expression a user writes today: ``log_softmax`` in
  float32, then entropy ``-(p * logp).sum(-1)``, ``max``/``argmax``, the target's rank
  ``(logp > logp[target]).sum(-1)`` and (for the top-k row) ``topk(5)``. Columns as the logits
  path; the speed-up is taken over ``token_stats(top_k=0)``.
- Timing and peak memory: :mod:`pplfast.cli.bench.measure` (one timer for every implementation).

One module per job: :mod:`.options` (command line -> :class:`~.options.Plan`), :mod:`.cases`
(inputs), :mod:`.peers` (what is timed), :mod:`.measure` (timer, bandwidth, memory probes),
:mod:`.environment` (machine and versions), :mod:`.runner` (the run -> a JSON-ready record),
:mod:`.report` (the table).

Adding a path (``--path NAME``): add ``NAME`` to ``options.PATHS`` with its default shapes and
dtypes in ``options.make_plan``; its inputs to ``cases.make_inputs`` (and its size in
``cases``); its implementations to ``peers.implementations`` (pplfast first, role
``"pplfast"``; baselines with role ``"baseline"``); its derived columns to ``runner._derive``
and its table header to ``report.render``. The timer, the memory probe (which rebuilds the
inputs and implementations by path name in its own process) and the JSON record need nothing.
"""
from __future__ import annotations

import functools
import json
import sys

from ...corpus.io import CorpusIOError
from ...corpus.writer import atomic_output
from .cases import linear_flops, logits_bytes, make_inputs
from .measure import cpu_peak_extra, cuda_peak_extra, read_bandwidth, time_call
from .options import (DEFAULT_BW_MIB, DTYPES, PATHS, SCHEMA, BenchError, MiB, Plan,
                      add_arguments, make_plan, parse_dtypes, parse_shapes)
from .peers import Impl, implementations
from .report import render
from .runner import bench

__all__ = [
    "DEFAULT_BW_MIB", "DTYPES", "PATHS", "BenchError", "Impl", "MiB", "Plan", "add_arguments",
    "bench", "cpu_peak_extra", "cuda_peak_extra", "describe", "implementations", "linear_flops",
    "logits_bytes", "make_inputs", "make_plan", "parse_dtypes", "parse_shapes", "read_bandwidth",
    "render", "run", "time_call",
]


def describe(plan: Plan) -> str:
    """What a run of ``plan`` would do: its command and one line per case (``--dry-run``)."""
    lines = [f"would run: {plan.command}"]
    lines += [f"  {path} {'x'.join(map(str, shape))} {dtype} on {plan.device.type}, backend "
              f"{plan.backend}" for path, shape, dtype in plan.cases]
    return "\n".join(lines)


def _write_json(path: str, record) -> None:
    """The record, whole, at ``path`` (rewritten after every case: a cut-off run keeps the
    cases that finished, marked ``"complete": false``)."""
    try:
        with atomic_output(path, label="--json") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    except CorpusIOError as exc:
        raise BenchError(str(exc)) from None


def run(args) -> int:
    try:
        plan = make_plan(args)
        if args.dry_run:
            print(describe(plan))
            return 0
        on_case = None
        if args.json not in (None, "-"):
            # written now: an unwritable path fails before minutes of timing, not after
            _write_json(args.json, {"schema": SCHEMA, "command": plan.command,
                                    "complete": False, "results": []})
            on_case = functools.partial(_write_json, args.json)
        record = bench(plan, progress=not args.no_progress, on_case=on_case)
        if args.json not in (None, "-"):
            _write_json(args.json, record)
    except BenchError as exc:
        print(f"pplfast bench: error: {exc}", file=sys.stderr)
        return 2
    text = render(record)
    if args.json == "-":
        print(text, file=sys.stderr)
        json.dump(record, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0
