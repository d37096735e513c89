"""The HTTP side of ``lowbit serve`` (FastAPI): OpenAI's routes, adapters added and removed at run time, metrics.

    GET  /v1/models                 the base and every base:adapter
    POST /v1/chat/completions       messages → choices (``stream``: server-sent events, ``data: [DONE]`` last)
    POST /v1/completions            prompt → choices
    POST /v1/adapters               {"name", "path"?}: read an adapter from under --adapter-root
    DELETE /v1/adapters/{name}      (409 while requests use it)
    GET  /metrics                   Prometheus text
    GET  /health

With an API key every route but ``/health`` and the page needs ``Authorization: Bearer <key>``. A client that goes
away cancels its sequences; a body over the limit is refused before it is read whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import LowbitError
from .engine import QueueFull
from .metrics import Metrics
from .requests import ApiError, parse_request

__all__ = ["build_app"]

OPEN = ("/health", "/", "/ui", "/favicon.ico")  # no key needed: the page itself asks for one
DRAIN_MAX_BYTES = 64 << 20  # an over-limit body up to this size is read (and dropped) before the 413 is sent


def build_app(server, api_key: str | None = None, extra_routes=None) -> FastAPI:
    """The app; ``extra_routes(app, server)`` adds more (the page's)."""
    engine, metrics = server.engine, Metrics(server.engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop, server.limits.shutdown_timeout)

    app = FastAPI(lifespan=lifespan, title="lowbit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server, app.state.metrics = server, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(metrics, e, request.url.path)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return _error(metrics, ApiError(str(e.detail), status=e.status_code, code=code), request.url.path)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path, limit = request.url.path, server.limits.max_body_bytes
        if api_key and path not in OPEN and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()):
            return _error(metrics, ApiError("Incorrect or missing API key (Authorization: Bearer <key>)", status=401,
                                            code="invalid_api_key"), path)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limit):
            if size.isdigit() and int(size) <= DRAIN_MAX_BYTES:
                # read it away first: a client still sending when the answer comes would see a broken pipe, not 413
                async for _ in request.stream():
                    pass
            return _error(metrics, ApiError(f"the request body is over {limit} bytes", status=413,
                                            code="request_too_large"), path)
        return await call_next(request)

    _openai_routes(app, server, metrics)
    _adapter_routes(app, server, metrics)
    if extra_routes is not None:
        extra_routes(app, server)
    return app


def _error(metrics, e: ApiError, route: str) -> JSONResponse:
    metrics.requests.labels(route, str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request, limit: int):
    """The request's JSON body, refused past ``limit`` bytes (a chunked body too) or when it is not JSON."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(f"the request body is over {limit} bytes", status=413, code="request_too_large")
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(f"the request body is not JSON ({e})") from None


def _openai_routes(app, server, metrics) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": m, "object": "model", "created": server.created,
                                            "owned_by": "lowbit"} for m in server.model_ids()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(request, True, server, metrics)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, False, server, metrics)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")


async def _complete(request: Request, chat: bool, server, metrics):
    """One completion request: its sequences submitted, then the whole answer or its stream."""
    route, started = request.url.path, time.monotonic()
    req = parse_request(await read_json(request, server.limits.max_body_bytes), chat)
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(index, kind, payload):  # from the engine's thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, (index, kind, payload))

    seqs, n_prompt = server.sequences(req, emit)
    try:
        server.engine.submit(seqs)
    except QueueFull as e:
        raise ApiError(str(e), status=429, code="queue_full", kind="rate_limit_error") from None
    metrics.prompt_tokens.inc(n_prompt)
    answer = _Answer(req, seqs, n_prompt, "chatcmpl" if chat else "cmpl")

    def finished(status: str) -> None:
        metrics.requests.labels(route, status).inc()
        metrics.completion_tokens.inc(answer.completion_tokens())
        metrics.latency.labels(route).observe(time.monotonic() - started)
        firsts = [s.first_token for s in seqs if s.first_token is not None]
        if firsts:
            metrics.first_token.observe(min(firsts) - started)

    if req.stream:
        return StreamingResponse(_events(answer, queue, finished), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while not answer.done():
            try:
                answer.take(*await asyncio.wait_for(queue.get(), 0.5))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    answer.cancel()
                    finished("499")
                    return Response(status_code=499)
    except asyncio.CancelledError:
        answer.cancel()
        raise
    if answer.failure:
        finished("500")
        raise ApiError(answer.failure, status=500, kind="server_error")
    finished("200")
    return answer.whole()


def _adapter_routes(app, server, metrics) -> None:
    engine = server.engine

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = await read_json(request, server.limits.max_body_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise ApiError('give {"name": …, "path": … (under the adapter root; default: the name)}', param="name")

        def add():
            with engine.model_lock:
                server.bank.add(body["name"], server.bank.resolve(body["name"], body.get("path")))

        try:
            await run_in_threadpool(add)
        except LowbitError as e:
            raise ApiError(str(e), param="path") from None
        metrics.requests.labels("/v1/adapters", "200").inc()
        return {"id": f"{server.name}:{body['name']}", "object": "model", "created": int(time.time()),
                "owned_by": "lowbit"}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        def remove():
            with engine.model_lock:  # the engine is between steps: its batches hold still
                if name not in server.bank.adapters:
                    raise ApiError(f"no adapter named {name!r}", status=404, code="model_not_found")
                busy = engine.in_use(name)
                if busy:
                    raise ApiError(f"adapter {name!r} is in use by {busy} sequences; try again when they end",
                                   status=409, code="adapter_in_use")
                server.bank.remove(name)

        await run_in_threadpool(remove)
        metrics.requests.labels("/v1/adapters", "200").inc()
        return {"id": f"{server.name}:{name}", "object": "model", "deleted": True}


async def _events(answer, queue, finished):
    """Server-sent events of a streamed answer; the client going away cancels its sequences."""
    status = "200"
    try:
        for chunk in answer.opening():
            yield _sse(chunk)
        while not answer.done():
            for chunk in answer.take(*await queue.get()):
                yield _sse(chunk)
        if answer.failure:
            status = "500"
            yield _sse(ApiError(answer.failure, status=500, kind="server_error").body())
        elif answer.req.include_usage:
            yield _sse({**answer.head(), "choices": [], "usage": answer.usage()})
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        raise
    finally:
        answer.cancel()
        finished(status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Answer:
    """One request's choices as their events come: the whole response, or its chunks."""

    def __init__(self, req, seqs, n_prompt: int, prefix: str):
        self.req, self.seqs, self.n_prompt = req, seqs, n_prompt
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.texts, self.finish = [""] * len(seqs), [None] * len(seqs)
        self.failure: str | None = None

    def done(self) -> bool:
        return self.failure is not None or all(f is not None for f in self.finish)

    def cancel(self) -> None:
        for s in self.seqs:
            if s.finish is None:
                s.cancelled = True

    def completion_tokens(self) -> int:
        return sum(len(s.tokens) + (s.finish == "stop" and s.last in s.stop_ids) for s in self.seqs)

    def usage(self) -> dict:
        done = self.completion_tokens()
        return {"prompt_tokens": self.n_prompt, "completion_tokens": done, "total_tokens": self.n_prompt + done}

    def head(self) -> dict:
        kind = "chat.completion.chunk" if self.req.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.req.model}

    def opening(self) -> list[dict]:
        if not self.req.chat:
            return []
        return [{**self.head(), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]} for i in range(len(self.seqs))]

    def take(self, index: int, kind: str, payload) -> list[dict]:
        """Record an engine event; the chunks it makes."""
        if kind == "error":
            self.failure = payload
            return []
        if kind == "delta":
            self.texts[index] += payload
            return [self._chunk(index, payload, None)]
        self.finish[index] = payload  # stop or length
        return [self._chunk(index, None, self.finish[index])]

    def _chunk(self, index: int, text: str | None, finish: str | None) -> dict:
        if self.req.chat:
            delta = {"content": text} if text is not None else {}
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.head(), "choices": [choice]}

    def whole(self) -> dict:
        if self.req.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(self.texts, self.finish))]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.req.model, "choices": choices,
                "usage": self.usage()}
