"""The HTTP side of `slmctl serve`: FastAPI routes in OpenAI's shapes around an `Engine`.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

Handlers only validate, submit and wait: the model runs on the engine's thread, so /health and
/metrics answer while it generates. Every error is a JSON body in OpenAI's error shape and the
server keeps serving; a client that disconnects has its request cancelled (its slot freed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmctl.errors import UserError
from slmctl.serve import protocol
from slmctl.serve.engine import Draining, Engine, QueueFull, Request
from slmctl.serve.limits import DISCONNECTED


class APIError(UserError):
    """A client's bad request, answered with a 4xx in OpenAI's error shape (where a command would exit 2)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass
class Served:
    """What the routes need to know about the served model."""

    name: str
    tokenizer: object
    max_prompt_tokens: int
    max_tokens_cap: int
    default_max_tokens: int
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    # prompt text + image URLs -> (token ids or None, embeds or None, image features or None); APIError on bad images
    encode: Callable[[str, list[str]], tuple] | None = None
    created: int = field(default_factory=protocol.now)
    max_token_chars: int = 64  # the most characters one token of the tokenizer covers (a prompt's fewest tokens)
    max_images: int = 8


DISCONNECT_CHECK_S = 0.5  # how often a plain (non-streamed) request looks whether its client is still there

ERROR_RESPONSES = {status: {"model": protocol.ErrorResponse, "description": why} for status, why in protocol.ERROR_STATUSES.items()}


def openapi_schema(app: FastAPI, secured: bool) -> dict:
    """The schema clients generate code from, as the server behaves: FastAPI's 422 (which this server never
    answers: a bad field is a 400 in OpenAI's error shape) taken out, the bearer key declared where one is set."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible completions from an slmctl encoder-decoder (docs/serve.md)")
        for route, operations in schema["paths"].items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if secured and route.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        if secured:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema


async def client_gone(http: HTTPRequest) -> bool:
    """Whether the client has closed its connection (told by `BodyLimit`, which reads the connection itself)."""
    gone = http.scope.get(DISCONNECTED)
    return gone.is_set() if gone is not None else await http.is_disconnected()


def authorized(header: str, api_key: str) -> bool:
    """Authorization: Bearer KEY, the scheme in any case (RFC 7235), the key compared in constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def create_app(engine: Engine, served: Served, metrics, api_key: str | None = None,
               log_request: Callable[[dict], None] | None = None, log_prompts: bool = False,
               metrics_public: bool = False, request_timeout_s: float | None = None) -> FastAPI:
    app = FastAPI(title="slmctl serve", version=protocol.API_VERSION, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.engine, app.state.served = engine, served
    app.openapi = lambda: openapi_schema(app, secured=api_key is not None)

    def error(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
        return JSONResponse(protocol.error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, e: APIError):
        return error(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError):
        first = e.errors()[0]
        kind = first.get("type")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not str(p).startswith("function-"))
        if kind == "json_invalid":
            return error(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
        if kind == "missing" and not where:
            return error(400, "the request body is empty: send a JSON object", code="invalid_json")
        if kind in ("model_attributes_type", "dict_type", "model_type") and not where:
            return error(400, "the request body must be a JSON object", code="invalid_json")
        if kind == "extra_forbidden":
            return error(400, f"unknown field: {where}", param=where, code="unknown_field")
        if kind == "missing":
            return error(400, f"missing required field: {where}", param=where, code="missing_field")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        field = where.split(".")[0] if where else None
        code = "unsupported_field" if "not supported" in message else "invalid_type" if kind.endswith("_type") else \
            "invalid_value"
        return error(400, f"{where}: {message}" if where else message, param=field, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HTTPRequest, e: StarletteHTTPException):
        if e.status_code == 400:  # the body could not be parsed at all (bytes that are not UTF-8, say)
            return error(400, f"the request body is not valid JSON in UTF-8 ({e.detail})", code="invalid_json")
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(e.status_code, str(e.detail), code=code)

    @app.middleware("http")
    async def _count_and_authorize(request: HTTPRequest, call_next):
        path = request.url.path
        guarded = path.startswith("/v1/") or (path == "/metrics" and not metrics_public)
        if api_key and guarded and not authorized(request.headers.get("authorization", ""), api_key):
            response = error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error",
                             code="invalid_api_key")
            metrics.request(path, 401)
            return response
        response = await call_next(request)
        if path.startswith("/v1/"):
            metrics.request(path, response.status_code)
        return response

    @app.get("/health")
    async def health():
        """200 while the model loop runs; 503 once it has failed (or the server is stopping)."""
        state = "failed" if engine.failure is not None else "stopping" if engine.draining else "ok"
        return JSONResponse({"status": state, "model": served.name, "active": engine.active, "waiting": engine.queue_depth},
                            status_code=200 if state == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "slmctl"}]}

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: protocol.CompletionRequest, http: HTTPRequest):
        return await _generate(body, body.prompt, [], body.max_tokens, chat=False, http=http)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: protocol.ChatRequest, http: HTTPRequest):
        prompt, images = protocol.render_chat(body.messages, served.tokenizer)
        return await _generate(body, prompt, images, body.limit, chat=True, http=http)

    async def _generate(body: protocol.Sampling, prompt: str, images: list[str], max_tokens, chat: bool, http):
        if body.model != served.name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")
        max_tokens = served.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > served.max_tokens_cap:
            raise APIError(400, f"max_tokens={max_tokens} is more than this server allows ({served.max_tokens_cap}: "
                                "slmctl serve ... max_tokens_cap=N raises it)", param="max_tokens", code="max_tokens_exceeded")
        where = "messages" if chat else "prompt"
        if not prompt and not images:
            raise APIError(400, "the prompt is empty: an encoder-decoder answers a source text, give one", param=where,
                           code="empty_prompt")
        if len(images) > served.max_images:
            raise APIError(400, f"{len(images)} images; this server takes at most {served.max_images} per request",
                           param="messages", code="too_many_images")
        fewest = -(-len(prompt) // served.max_token_chars)  # no tokenizing of text that cannot fit
        if fewest > served.max_prompt_tokens:
            raise APIError(400, f"the prompt is at least {fewest} tokens; this model reads at most {served.max_prompt_tokens}",
                           param=where, code="context_length_exceeded")
        ids, embeds, image_features = await run_in_threadpool(served.encode, prompt, images)
        length = len(ids) if ids is not None else int(embeds.shape[0])
        if length > served.max_prompt_tokens:
            raise APIError(400, f"the prompt is {length} tokens; this model reads at most {served.max_prompt_tokens}",
                           param=where, code="context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(event: dict) -> None:  # engine thread -> event loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed (the server stopped)
                pass

        temperature = served.default_temperature if body.temperature is None else body.temperature
        request = Request(prompt=ids, embeds=embeds, image_features=image_features, max_tokens=max_tokens, on_event=on_event,
                          temperature=temperature, top_p=served.default_top_p if body.top_p is None else body.top_p,
                          seed=body.seed, stop=body.stops, ignore_eos=body.ignore_eos)
        if request_timeout_s:
            request.deadline = request.submitted + request_timeout_s
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity ({e}); retry later", kind="rate_limit_error",
                           code="queue_full") from None
        except Draining as e:
            raise APIError(503, str(e), kind="server_error", code="unavailable") from None
        rid, created = protocol.new_id("chatcmpl" if chat else "cmpl"), protocol.now()
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"

        def record(done: dict, status: int) -> None:
            if log_request is None:
                return
            entry = {"id": rid, "time": time.time(), "endpoint": endpoint, "status": status, "stream": body.stream,
                     "finish_reason": done.get("finish_reason"), "prompt_tokens": done.get("prompt_tokens"),
                     "completion_tokens": done.get("completion_tokens"),
                     **{k: done[k] for k in ("drafted_tokens", "accepted_tokens") if k in done},
                     "first_token_s": None if request.first_token_at is None else round(request.first_token_at - request.submitted, 6),
                     "duration_s": round(time.perf_counter() - request.submitted, 6)}
            if log_prompts:
                entry["prompt"] = prompt
            log_request(entry)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(request, events, rid, created, chat, include_usage, record),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, done, next_check = [], None, time.monotonic() + DISCONNECT_CHECK_S
        while done is None:
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() >= next_check:  # however fast tokens come: a client gone is noticed within the interval
                next_check = time.monotonic() + DISCONNECT_CHECK_S
                if await client_gone(http):
                    engine.cancel(request)
            if event is None:
                continue
            if event["type"] == "text":
                text.append(event["text"])
            else:
                done = event
        if done["finish_reason"] == "timeout":
            record(done, 504)
            raise APIError(504, done.get("message", "the request ran past its deadline"), kind="server_error", code="timeout")
        if done["finish_reason"] in ("error", "cancelled"):
            record(done, 500)
            raise APIError(500, done.get("message", "generation did not finish"), kind="server_error")
        record(done, 200)
        out = protocol.completion_body(rid, served.name, "".join(text), done["finish_reason"], chat, created)
        out["usage"] = protocol.usage(done["prompt_tokens"], done["completion_tokens"])
        return out

    async def _stream(request: Request, events: asyncio.Queue, rid: str, created: int, chat: bool, include_usage: bool,
                      record):
        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        done, first = None, True
        try:
            if chat:  # the role first, as OpenAI does
                yield sse(protocol.completion_body(rid, served.name, "", None, chat, created, delta=True, first=True))
                first = False
            while done is None:
                event = await events.get()
                if event["type"] == "text":
                    yield sse(protocol.completion_body(rid, served.name, event["text"], None, chat, created, delta=True,
                                                       first=first))
                    first = False
                else:
                    done = event
            if done["finish_reason"] in ("error", "cancelled", "timeout"):
                timeout = done["finish_reason"] == "timeout"
                record(done, 504 if timeout else 500)
                yield sse(protocol.error_body(done.get("message", "generation did not finish"), "server_error",
                                              code="timeout" if timeout else None))
                return
            yield sse(protocol.completion_body(rid, served.name, None, done["finish_reason"], chat, created, delta=True))
            if include_usage:
                chunk = protocol.completion_body(rid, served.name, None, None, chat, created, delta=True)
                chunk["choices"] = []
                chunk["usage"] = protocol.usage(done["prompt_tokens"], done["completion_tokens"])
                yield sse(chunk)
            yield "data: [DONE]\n\n"
            record(done, 200)
        finally:
            if done is None:  # the client went away mid-stream: free the slot
                engine.cancel(request)
                record({"finish_reason": "cancelled", "prompt_tokens": request.prompt_tokens,
                        "completion_tokens": len(request.tokens)}, 499)

    return app
