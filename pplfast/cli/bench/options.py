"""Options of ``pplfast bench``: the command line, parsed into a :class:`Plan` of cases."""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ...api import BACKENDS

SCHEMA = "pplfast-bench/1"

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PATHS = ("logits", "linear", "all", "stats", "compare")
DEVICES = ("cpu", "cuda")

DEFAULT_LOGITS_SHAPES = ((4096, 32000), (4096, 50257), (4096, 128256))
DEFAULT_LOGITS_DTYPES = ("fp32", "bf16")
DEFAULT_COMPARE_SHAPES = ((4096, 128256),)
DEFAULT_LINEAR_SHAPES = {"cpu": ((4096, 1024, 128256),), "cuda": ((8192, 4096, 131072),)}
DEFAULT_LINEAR_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
# auto reps: enough calls to fill this many seconds, within [min, max]
AUTO_REPS = {"cpu": (0.5, 3, 25), "cuda": (0.2, 10, 100)}
DEFAULT_BW_MIB = {"cpu": 1024, "cuda": 2048}

MiB = 1 << 20


class BenchError(ValueError):
    """A bad option: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Columns: ms = median time of one call; GB/s = logits bytes / time; G elem/s = logits\n"
        "read / time (compare: both tensors); %read-BW = GB/s over the read bandwidth measured in\n"
        "the same run (with --interleave, in the same rounds); TFLOP/s = 2*N*D*V / time; %matmul = the\n"
        "rate of a plain hidden @ weight.T of the same shape over this row's time; pplfast\n"
        "speed-up = this row's time / pplfast's time; peak extra MiB = memory the call adds at\n"
        "its peak (inputs excluded, output included).\n"
        "Defaults finish in about a minute on a 2-core CPU (logits path). The hidden path on CPU\n"
        "runs for many minutes (about a TFLOP per call at the default shape): pass smaller\n"
        "--shapes, or --reps 1 --warmup 0, for a quick look."
    )
    parser.add_argument(
        "--path", default="logits", metavar="{logits,linear,all,stats,compare}",
        help="stats: token_stats (top_k 0 and 5) against the PyTorch log_softmax expression, on "
        "NxV shapes; compare: pplfast.compare of two logits tensors against log_softmax + kl_div "
        "+ argmax (default shape 4096x128256); logits: token_nll on materialised logits "
        "(default); linear: linear_token_nll on hidden states and the output layer; all: logits "
        "and linear",
    )
    parser.add_argument(
        "--shapes", default=None, metavar="NxV,...",
        help="comma-separated shapes: NxV (rows x vocabulary) for the logits path, NxDxV "
        "(rows x hidden width x vocabulary) for the linear path; with --path all each shape "
        "goes to the path its form names. Defaults: 4096x32000,4096x50257,4096x128256; linear "
        "4096x1024x128256 on CPU, 8192x4096x131072 on GPU",
    )
    parser.add_argument(
        "--dtypes", default=None, metavar="fp32,bf16",
        help="comma-separated input dtypes among fp32, bf16, fp16. Defaults: fp32,bf16 for "
        "logits; fp32 (CPU) or bf16 (GPU) for linear",
    )
    parser.add_argument(
        "--backend", default="auto", metavar="{auto,cpu,triton,cuda,reference}",
        help="pplfast backend to time (default auto); the baselines are unaffected",
    )
    parser.add_argument(
        "--device", default=None, metavar="{cpu,cuda}",
        help="where the tensors live (default: cuda when a GPU is present, else cpu)",
    )
    parser.add_argument(
        "--reps", default=None, type=int, metavar="N",
        help="timed calls per implementation and case; the median is reported (default: "
        "enough to fill 0.5 s on CPU / 0.2 s on GPU, at least 3 / 10)",
    )
    parser.add_argument(
        "--interleave", action="store_true",
        help="call the implementations of a case in turn, one call each per round (the reps are "
        "rounds), together with the read-bandwidth probe, so that a slow period of a shared "
        "machine slows every row alike; %%read-BW then uses the probe of the same rounds",
    )
    parser.add_argument(
        "--warmup", default=None, type=int, metavar="N",
        help="untimed calls before timing (default 1 on CPU, 3 on GPU)",
    )
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="FILE",
        help="also write the results as JSON to FILE; '-' (or no FILE) writes JSON to stdout "
        "and the table to stderr",
    )
    parser.add_argument(
        "--no-memory", action="store_true",
        help="skip the peak-memory probes (on CPU they run in a separate process)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar / progress lines on stderr",
    )
    parser.add_argument(
        "--bandwidth-mib", default=None, type=int, metavar="MIB",
        help="size of the buffer read to measure bandwidth (default 1024 on CPU, 2048 on GPU)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check the options and print the cases that would run, without running them (also "
        "for --device cuda on a machine without a GPU)",
    )


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    """``"4096x32000,8x16x100"`` -> ``[(4096, 32000), (8, 16, 100)]``; BenchError when malformed."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        parts = item.lower().replace("×", "x").split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            dims = ()
        if len(dims) not in (2, 3) or any(d <= 0 for d in dims):
            raise BenchError(
                f"bad shape {item!r} in --shapes: expected NxV (e.g. 4096x32000) or NxDxV "
                "(e.g. 4096x1024x128256) with positive integers"
            )
        shapes.append(dims)
    return shapes


def parse_dtypes(text: str) -> List[str]:
    names = []
    for item in text.split(","):
        key = item.strip().lower()
        if key not in DTYPES:
            raise BenchError(f"unknown dtype {item.strip()!r} in --dtypes: choose from fp32, bf16, fp16")
        name = DTYPE_NAMES[DTYPES[key]]
        if name not in names:
            names.append(name)
    return names


@dataclass
class Plan:
    device: torch.device
    backend: str
    cases: List[Tuple[str, Tuple[int, ...], str]]  # (path, shape, dtype)
    warmup: int
    reps: Optional[int]
    memory: bool
    bandwidth_bytes: int
    command: str
    interleave: bool = False


def make_plan(args) -> Plan:
    if args.path not in PATHS:
        raise BenchError(f"unknown --path {args.path!r}: choose from {', '.join(PATHS)}")
    if args.backend not in BACKENDS:
        raise BenchError(f"unknown --backend {args.backend!r}: choose from {', '.join(BACKENDS)}")
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name not in DEVICES:
        raise BenchError(f"unknown --device {device_name!r}: choose from cpu, cuda")
    if device_name == "cuda" and not torch.cuda.is_available() and not getattr(args, "dry_run",
                                                                                False):
        raise BenchError("--device cuda: no CUDA GPU is visible to torch here")
    for flag, value, low in (("--reps", args.reps, 1), ("--warmup", args.warmup, 0),
                             ("--bandwidth-mib", args.bandwidth_mib, 1)):
        if value is not None and value < low:
            raise BenchError(f"{flag} must be >= {low}, got {value}")
    kind = device_name
    paths = ("logits", "linear") if args.path == "all" else (args.path,)
    shapes = parse_shapes(args.shapes) if args.shapes is not None else None
    if shapes is not None:
        if args.path in ("logits", "stats", "compare") and any(len(s) != 2 for s in shapes):
            raise BenchError(f"--path {args.path} takes NxV shapes; NxDxV shapes need --path "
                             "linear or all")
        if args.path == "linear" and any(len(s) != 3 for s in shapes):
            raise BenchError("--path linear takes NxDxV shapes (rows x hidden width x vocabulary)")
    dtypes = parse_dtypes(args.dtypes) if args.dtypes is not None else None
    cases = []
    for path in paths:
        logits_like = path in ("logits", "stats", "compare")
        rank = 2 if logits_like else 3
        if shapes is None:
            path_shapes = {"compare": DEFAULT_COMPARE_SHAPES, "linear": DEFAULT_LINEAR_SHAPES[kind]
                           }.get(path, DEFAULT_LOGITS_SHAPES)
        else:
            path_shapes = [s for s in shapes if len(s) == rank]
        if dtypes is None:
            path_dtypes = DEFAULT_LOGITS_DTYPES if logits_like else DEFAULT_LINEAR_DTYPES[kind]
        else:
            path_dtypes = dtypes
        for shape in path_shapes:
            for dtype in path_dtypes:
                cases.append((path, tuple(shape), dtype))
    if not cases:
        raise BenchError("nothing to run: no shape matches the chosen --path")
    warmup = DEFAULT_WARMUP[kind] if args.warmup is None else args.warmup
    bw_mib = DEFAULT_BW_MIB[kind] if args.bandwidth_mib is None else args.bandwidth_mib
    shapes_text = ",".join(sorted({"x".join(map(str, s)) for _, s, _ in cases},
                                  key=lambda t: [int(v) for v in t.split("x")]))
    dtypes_text = ",".join(dict.fromkeys(d for _, _, d in cases))
    words = ["pplfast", "bench", "--path", args.path, "--shapes", shapes_text, "--dtypes",
             dtypes_text, "--backend", args.backend, "--device", device_name]
    if args.reps is not None:
        words += ["--reps", str(args.reps)]
    if args.warmup is not None:
        words += ["--warmup", str(args.warmup)]
    interleave = bool(getattr(args, "interleave", False))
    if interleave:
        words.append("--interleave")
    if args.no_memory:
        words.append("--no-memory")
    if args.bandwidth_mib is not None:
        words += ["--bandwidth-mib", str(args.bandwidth_mib)]
    return Plan(torch.device(device_name), args.backend, cases, warmup, args.reps,
                not args.no_memory, bw_mib * MiB, shlex.join(words), interleave)


