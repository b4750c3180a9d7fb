"""The FastAPI app: routes, limits, bearer key, errors in OpenAI's shape, metrics.

:func:`create_app` takes models already loaded (:class:`pplfast.serve.engine.ModelEngine`), so
that nothing a request says ever loads a file or a model; the app's lifespan starts one scoring
worker per model (:mod:`pplfast.serve.batcher`) and, on shutdown, lets them finish what is
queued. The same app runs under uvicorn (``pplfast serve``) and as a Ray Serve deployment.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import native, openai, sglang
from .batcher import Batcher, Job, QueueFull
from .engine import TREE_MIN_SHARED, ModelEngine, compare_problem, comparison_figures, run_compare
from .errors import APIError, bad_request, field_path
from .metrics import Metrics
from .packing import plan_passes

ENDPOINTS = ("/v1/completions", "/generate", "/v1/score", "/v1/compare", "/v1/models", "/health",
             "/metrics", "/tokenizer_info", "/tokenize", "/detokenize")
OPEN_PATHS = ("/health",)  # answered without the bearer key


@dataclass
class Limits:
    """The server's limits (``pplfast serve --help`` gives each)."""

    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_request_tokens: int = 1 << 20
    max_body_bytes: int = 64 << 20
    api_key: Optional[str] = None


class Server:
    """The served models and their scoring workers."""

    def __init__(self, engines: Dict[str, ModelEngine], limits: Limits) -> None:
        if not engines:
            raise ValueError("no model to serve")
        self.engines, self.limits, self.metrics = engines, limits, Metrics()
        self.default = next(iter(engines))
        self.replica = uuid.uuid4().hex[:12]
        self.batchers = {name: Batcher(name, self._planner(e), self._runner(e),
                                       max_batch_tokens=limits.max_batch_tokens,
                                       max_wait_ms=limits.max_wait_ms,
                                       max_queue=limits.max_queue, metrics=self.metrics)
                         for name, e in engines.items()}

    def _planner(self, engine: ModelEngine) -> Callable:
        def plan(kind, seqs):
            tree = engine.tree if kind == "score" else None
            return plan_passes(seqs, max_tokens=self.limits.max_batch_tokens,
                               min_shared=TREE_MIN_SHARED if tree else 0,
                               max_row=tree.max_row if tree else 0)
        return plan

    def _runner(self, engine: ModelEngine) -> Callable:
        def run(kind, p):
            if kind == "score":
                engine.run(p)
            else:
                run_compare(self.engines[kind[1]], engine, p)
        return run

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        for b in self.batchers.values():
            b.stop(timeout)

    def engine(self, name: Optional[str], param: str = "model") -> ModelEngine:
        if name is None:
            return self.engines[self.default]
        if name not in self.engines:
            raise APIError(404, f"{param}: model {name!r} is not served here (served: "
                           f"{', '.join(map(repr, self.engines))})", param=param,
                           code="model_not_found")
        return self.engines[name]

    async def score(self, engine: ModelEngine, kind, seqs: List, request: Request) -> None:
        """Queue ``seqs`` on ``engine``'s worker and wait for their results; a client that
        leaves meanwhile cancels them (only its own rows)."""
        seqs = [s for s in seqs if s is not None]
        if not seqs:
            return
        self.metrics.prompt_tokens.labels(engine.name).inc(sum(len(s) for s in seqs))
        batcher = self.batchers[engine.name]
        job = Job(kind, seqs, asyncio.get_running_loop())
        try:
            future = batcher.submit(job)
        except QueueFull as exc:
            raise APIError(503, f"{exc}: retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
            if future in done:
                try:
                    future.result()
                except Exception as exc:
                    raise APIError(500, f"scoring failed: {type(exc).__name__}: {exc}",
                                   code="scoring_failed") from None
                return
            raise ClientGone()
        finally:
            gone.cancel()
            if not future.done():
                batcher.cancel(job)


class ClientGone(Exception):
    """The client disconnected before its answer."""


async def _client_gone(request: Request) -> None:
    while True:  # after the body, receive() returns only when the client disconnects
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _validate(cls, body: dict):
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = field_path(err["loc"])
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param) from None


def _json(payload) -> Response:
    return Response(json.dumps(payload, separators=(",", ":"), allow_nan=False),
                    media_type="application/json")


def create_app(engines: Dict[str, ModelEngine], limits: Optional[Limits] = None, *,
               on_ready: Optional[Callable[[], None]] = None) -> FastAPI:
    """The scoring app over loaded ``engines`` (name -> engine; the first is the default)."""
    server = Server(engines, limits or Limits())

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await run_in_threadpool(server.stop)

    app = FastAPI(title="pplfast serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    _routes(app, server)
    _errors(app, server)
    app.add_middleware(_BodyLimit, limit=server.limits.max_body_bytes)
    app.add_middleware(_BearerKey, key=server.limits.api_key)
    app.add_middleware(_Measured, metrics=server.metrics)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    limit = server.limits.max_request_tokens

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _validate(openai.CompletionRequest, await _json_body(request))
        engine = server.engine(req.model)
        prompts, seqs = await run_in_threadpool(openai.parse, req, engine, limit)
        await server.score(engine, "score", seqs, request)
        return _json(await run_in_threadpool(openai.response, req, engine, prompts, seqs))

    @app.post("/generate")
    async def generate(request: Request):
        req = _validate(sglang.GenerateRequest, await _json_body(request))
        engine = server.engine(req.model)
        prompts, seqs, max_new, start, batch = await run_in_threadpool(sglang.parse, req, engine,
                                                                       limit)
        await server.score(engine, "score", seqs, request)
        return _json(await run_in_threadpool(sglang.response, req, engine, prompts, seqs,
                                             max_new, start, batch))

    @app.post("/v1/score")
    async def score(request: Request):
        req = _validate(native.ScoreRequest, await _json_body(request))
        engine = server.engine(req.model)
        docs = await run_in_threadpool(native.parse_score, req, engine, limit)
        await server.score(engine, "score", [s for d in docs for s in d.sequences], request)
        return _json(await run_in_threadpool(native.score_response, req, engine, docs))

    @app.post("/v1/compare")
    async def compare(request: Request):
        req = _validate(native.CompareRequest, await _json_body(request))
        names = list(server.engines)
        if len(names) < 2:
            raise bad_request("comparing needs two served models (start the server with "
                              "--model NAME=PATH for the second)", "base")
        test = server.engine(req.model if req.model is not None else names[1])
        base = server.engine(req.base if req.base is not None else
                             names[0] if test.name != names[0] else names[1], "base")
        if base is test:
            raise bad_request(f"base and model are both {test.name!r}", "base")
        problem = compare_problem(base, test)
        if problem:
            raise bad_request(problem, "base")
        docs = await run_in_threadpool(native.documents, req, test, limit)
        await server.score(test, ("compare", base.name),
                           [s for d in docs for s in d.sequences], request)
        return _json(await run_in_threadpool(native.compare_response, req, base, test, docs,
                                             comparison_figures))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pplfast",
             "max_model_len": e.context} for name, e in server.engines.items()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(server.engines), "replica": server.replica}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: Optional[str] = None):
        e = server.engine(model)
        template = getattr(e.tokenizer, "chat_template", None)
        return {"tokenizer_class": type(e.tokenizer).__name__, "model_max_length": e.context,
                "vocab_size": e.vocab_size, "chat_template": template if isinstance(
                    template, str) else None,
                **{k: e.special_token(k) for k in ("bos_token", "eos_token", "pad_token",
                                                   "unk_token")}}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request)
        e = server.engine(body.get("model"))
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string", "prompt")
        if not isinstance(special, bool):
            raise bad_request("add_special_tokens must be true or false", "add_special_tokens")
        tokens = await run_in_threadpool(e.encode, prompt, add_special_tokens=special)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": e.context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json_body(request)
        e = server.engine(body.get("model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < e.vocab_size
                for t in tokens):
            raise bad_request(f"tokens must be a list of token ids in [0, {e.vocab_size})",
                              "tokens")
        return {"prompt": e.decode(tokens)}


def _errors(app: FastAPI, server: Server) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request, exc):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request, exc):
        error = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(error.body(), status_code=500)


async def _send_error(send, error: APIError) -> None:
    body = error.json_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BearerKey:
    """Every path but /health needs ``Authorization: Bearer KEY`` when a key is set."""

    def __init__(self, app, key: Optional[str]) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                error = APIError(401, "missing or wrong API key: send Authorization: Bearer "
                                 "<key>", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                return await _send_error(send, error)
        await self.app(scope, receive, send)


class _BodyLimit:
    """Reads the whole body before the app does; one larger than ``limit`` bytes gets 413."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = APIError(413, f"request body larger than this server takes "
                         f"(--max-body-mb, {self.limit} bytes)", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, error)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(send, error)
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


class _Measured:
    """Counts answers per endpoint and status, and times them."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = [500]
        started = time.perf_counter()

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
