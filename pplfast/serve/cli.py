"""``pplfast serve``: the scoring server's command line (``pip install "pplfast[serve]"``).

The port is bound and every model loaded before the server starts, so a busy port or a model
that cannot be loaded is one line on stderr and exit code 1. When the server answers, one line
``pplfast serve: listening on http://HOST:PORT`` goes to stderr. SIGTERM (and Ctrl-C) stop it
gracefully: no new connection is accepted, requests in flight are answered (for at most
``--drain-timeout`` seconds), then the workers finish and the process exits 0 (130 after
Ctrl-C, as every pplfast command).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from ..api import BACKENDS
from ..models.loading import DTYPES, ModelLoadError, check_model_dir, first_line, parse_device
from .._optional import require



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_spec", nargs="?", metavar="MODEL",
                        help="the model to serve: a saved Hugging Face model directory or hub id, "
                             "or NAME=PATH to serve it as NAME (default name: MODEL as given)")
    parser.add_argument("--model", dest="models", action="append", default=None,
                        metavar="NAME=PATH", help="one more model (repeat); a second model "
                                                  "enables /v1/compare")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model dtype (auto: the checkpoint's on GPU, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="pplfast kernel backend")
    parser.add_argument("--max-batch-tokens", type=int, default=8192,
                        help="most tokens of one forward pass, padding included (bounds memory)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="longest a request waits for others to share its pass")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting per model; more are refused with 503")
    parser.add_argument("--max-request-tokens", type=int, default=1 << 20,
                        help="most tokens in one request (400 beyond)")
    parser.add_argument("--max-body-mb", type=float, default=64.0,
                        help="largest request body in MiB (413 beyond)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                             "(default: $PPLFAST_API_KEY; none when unset)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds to finish requests in flight after SIGTERM")
    parser.add_argument("--no-prefix-sharing", action="store_true",
                        help="score shared prefixes once per sequence (no prefix-tree rows)")
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (info: one line per request)")
    parser.add_argument("--ray", action="store_true",
                        help="run as a Ray Serve deployment (pip install \"pplfast[ray-serve]\"); "
                             "connects to $RAY_ADDRESS or starts a local Ray instance")
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: replicas")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per replica")


def _error(message: str) -> int:
    print(f"pplfast serve: error: {message}", file=sys.stderr)
    return 1


def model_specs(args) -> list:
    """``[(name, path)]`` from MODEL and every ``--model``; ValueError on a bad one."""
    specs = []
    given = ([args.model_spec] if args.model_spec else []) + (args.models or [])
    for i, spec in enumerate(given):
        if i > 0 or "=" in spec and not os.path.exists(spec):
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--model takes NAME=PATH, got {spec!r}")
        else:
            name = path = spec
        if any(name == n for n, _ in specs):
            raise ValueError(f"two models are named {name!r}")
        specs.append((name, path))
    if not specs:
        raise ValueError("no model given: pplfast serve MODEL [--model NAME=PATH ...]")
    return specs


def limits_of(args):
    from .app import Limits

    for name in ("max_batch_tokens", "max_queue", "max_request_tokens", "replicas"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_wait_ms", "drain_timeout", "num_gpus"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    return Limits(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                  max_queue=args.max_queue, max_request_tokens=args.max_request_tokens,
                  max_body_bytes=int(args.max_body_mb * 2**20),
                  api_key=args.api_key or os.environ.get("PPLFAST_API_KEY") or None)


def load_engines(specs, args) -> dict:
    from .engine import ModelEngine

    device = parse_device(args.device, option="--device")
    return {name: ModelEngine.load(name, path, device=device, dtype=args.dtype,
                                   backend=args.backend, trees=not args.no_prefix_sharing)
            for name, path in specs}


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    try:
        for module in ("fastapi", "uvicorn", "prometheus_client"):
            require(module, extra="serve", feature="pplfast serve")
        specs = model_specs(args)
        limits = limits_of(args)
        if args.ray:
            for _, path in specs:
                check_model_dir(path)  # before Ray starts: one line, as without --ray
            from .ray_serve import serve_on_ray

            return serve_on_ray(specs, args, limits)
        sock = _listen(args.host, args.port)
    except (ImportError, ValueError) as exc:
        return _error(first_line(exc))
    try:
        engines = load_engines(specs, args)
    except (ModelLoadError, ValueError) as exc:
        sock.close()
        return _error(first_line(exc))
    import uvicorn

    from .app import create_app

    host, port = sock.getsockname()[:2]

    def ready() -> None:
        print(f"pplfast serve: listening on http://{host}:{port} (models: "
              f"{', '.join(engines)})", file=sys.stderr, flush=True)

    app = create_app(engines, limits, on_ready=ready)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "info",
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    # uvicorn raises the signal that stopped it again once it is done: SIGTERM then ends here
    # with exit code 0 instead of killing the process
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
