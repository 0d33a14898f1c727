"""The Starlette app: OpenAI's routes over the worker, with limits, an optional API key and JSON errors."""

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import DLLMError
from .metrics import Metrics
from .requests import parse
from .responses import Reply, error
from .tools import ToolCallParser, split_reply
from .worker import Event, Handle, Loaded, QueueFull, Worker

log = logging.getLogger("mlx_dllm.server")


@dataclass
class Settings:
    max_tokens: int = 512  # the default and the most a request may ask for
    max_body_bytes: int = 1 << 20
    api_key: Optional[str] = None
    prompt_cache_size: int = 10  # states kept for reuse (mlx_lm.server's default); 0: none
    prompt_cache_bytes: Optional[int] = None  # their most bytes (None: no limit)
    decode_concurrency: int = 1  # requests decoded together in one batch (1: one at a time)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(error(status, message), status_code=status)


async def read_json(request: Request, limit: int):
    """The body as JSON, refused once it passes `limit` bytes (whatever Content-Length claims)."""
    body = bytearray()
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise DLLMError(f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)")
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise DLLMError(f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise DLLMError("the request body is not valid JSON") from None


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_event(handle: Handle, gone: asyncio.Future) -> Optional[Event]:
    """The job's next event, or None once the client has disconnected."""
    get = asyncio.ensure_future(handle.events.get())
    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    return None


def error_message(value: BaseException):
    """(status, message): our checks' one line as a 400; anything else a 500 without the traceback."""
    if isinstance(value, DLLMError):
        return 400, str(value)
    return 500, f"the generation failed ({type(value).__name__}); the server log has details"


def failure(event: Event) -> JSONResponse:
    return error_response(*error_message(event.value))


def sse(body) -> str:
    return f"data: {json.dumps(body)}\n\n"


def create_app(worker: Worker, loaded: Loaded, settings: Settings, metrics: Metrics) -> Starlette:
    created = int(time.time())

    async def generate(request: Request, chat: bool):
        try:
            parsed = parse(await read_json(request, settings.max_body_bytes), chat, loaded.tokenizer,
                           settings.max_tokens)
        except DLLMError as bad:
            metrics.count("bad_request")
            return error_response(400, str(bad))
        try:
            handle = worker.submit(parsed.job, asyncio.get_running_loop())
        except QueueFull:
            metrics.count("queue_full")
            return error_response(429, "the server's queue is full; retry later")
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        reply = Reply(loaded.name, chat)
        try:
            event = await next_event(handle, gone)  # the generation's own checks run before its first response
            if parsed.stream and event is not None and event.kind == "response":
                gone.cancel()  # from here the streaming response notices a disconnect itself
                parser = ToolCallParser(loaded.tokenizer, parsed.tools, True) if parsed.tools else None
                return StreamingResponse(stream(handle, event, reply, parsed.include_usage, parser),
                                         media_type="text/event-stream")
            text, last = "", None
            while event is not None and event.kind == "response":
                text, last = text + event.value.text, event.value
                event = await next_event(handle, gone)
            if event is None:  # nobody reads this reply; the job stops at its next chunk
                handle.cancel()
                return error_response(400, "the client disconnected")
            if event.kind == "error":
                return failure(event)
            if not parsed.tools:
                return JSONResponse(reply.whole(text, last))
            content, calls, parser = split_reply(loaded.tokenizer, parsed.tools, text)
            return JSONResponse(reply.whole(content, last, calls, parser.finish_reason(last.finish_reason)))
        finally:
            gone.cancel()

    async def stream(handle: Handle, first: Event, reply: Reply, include_usage: bool,
                     parser: Optional[ToolCallParser]):
        def deltas(content, calls):
            if content:
                yield sse(reply.chunk(content))
            if calls:  # a call goes out whole, once its end marker has arrived
                yield sse(reply.chunk("", tool_calls=calls))

        try:
            if reply.chat:
                yield sse(reply.chunk("", role=True))  # OpenAI's first chunk names the role
            event, last = first, None
            while event.kind == "response":
                last = event.value
                for body in deltas(*parser.add(last.text)) if parser else deltas(last.text, None):
                    yield body
                event = await handle.events.get()
            if event.kind == "error":
                yield sse(error(*error_message(event.value)))
            else:
                finish_reason = last.finish_reason
                if parser:
                    for body in deltas(*parser.finish()):
                        yield body
                    finish_reason = parser.finish_reason(finish_reason)
                yield sse(reply.chunk("", finish_reason=finish_reason))
                if include_usage:
                    yield sse(reply.usage_chunk(last))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # a client that left stops its generation at its next chunk

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "mlx-dllm"}
            for name in dict.fromkeys((loaded.name, *loaded.aliases))]})

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def metrics_route(request: Request):
        return JSONResponse({**metrics.snapshot(), "queued": worker.queued})

    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, exc.detail)

    async def server_error(request: Request, exc: Exception):
        log.exception("request failed", exc_info=exc)
        return error_response(500, "internal server error; the server log has details")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    if settings.api_key:
        app.add_middleware(APIKey, key=settings.api_key, metrics=metrics)
    return app


class APIKey:
    """`Authorization: Bearer KEY` on every route but /health (which a supervisor polls without one)."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(header, b"Bearer " + self.key):
                self.metrics.count("unauthorized")
                await error_response(401, "invalid or missing API key")(scope, receive, send)
                return
        await self.app(scope, receive, send)
