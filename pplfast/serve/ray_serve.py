"""``pplfast serve --ray``: the same FastAPI app as a Ray Serve deployment.

Each replica loads the models itself (``ray_actor_options``: ``--num-gpus`` GPUs, Ray's default
one CPU) and builds the app of :func:`pplfast.serve.app.create_app` with its own scoring
workers; Ray Serve's proxy spreads the requests over the ``--replicas`` replicas on one address.
The process connects to the cluster of ``$RAY_ADDRESS``, else starts a local Ray instance, and
stays until SIGTERM or Ctrl-C, when it shuts the deployment down (replicas finish their requests
first) and exits.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from .._optional import require

ray = require("ray", extra="ray-serve", feature="pplfast serve --ray")
serve = require("ray.serve", extra="ray-serve", feature="pplfast serve --ray")


@serve.deployment
@serve.ingress()
class PplfastReplica:
    """One replica: the models, then (``__serve_build_asgi_app__``) the app over them."""

    def __init__(self, specs, options: dict, limits) -> None:
        from ..models.loading import parse_device
        from .engine import ModelEngine

        device = parse_device(options["device"], option="--device")
        self.limits = limits
        self.engines = {name: ModelEngine.load(name, path, device=device, dtype=options["dtype"],
                                               backend=options["backend"],
                                               trees=options["trees"])
                        for name, path in specs}

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.engines, self.limits)


def serve_on_ray(specs, args, limits) -> int:
    """Deploy, print where it listens, wait for SIGTERM / Ctrl-C, shut down."""
    if args.port == 0:
        raise ValueError("--ray needs a fixed --port (Ray Serve's proxy binds it)")
    stop, signals = threading.Event(), []

    def received(signum, frame):
        signals.append(signum)
        stop.set()

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    # after ray.init, which installs its own SIGTERM handler
    previous = {s: signal.signal(s, received) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        options = {"device": args.device, "dtype": args.dtype, "backend": args.backend,
                   "trees": not args.no_prefix_sharing}
        actor = {"num_gpus": args.num_gpus} if args.num_gpus else {}
        app = PplfastReplica.options(num_replicas=args.replicas,
                                     ray_actor_options=actor).bind(specs, options, limits)
        serve.run(app, name="pplfast", route_prefix="/")
        print(f"pplfast serve: listening on http://{args.host}:{args.port} (models: "
              f"{', '.join(n for n, _ in specs)}; {args.replicas} Ray Serve replicas)",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        serve.shutdown()
        ray.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signal.SIGINT in signals:
        raise KeyboardInterrupt
    return 0
