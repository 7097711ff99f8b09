"""OpenAI-compatible HTTP API on the router: /v1/chat/completions, /v1/completions, /v1/models.

Runs in the router's event loop beside the gRPC server and shares its frontend (validation,
chat template, tokenization) and dispatcher (replica choice, reasoning split), so both APIs route
and behave alike. As DeepSeek's own API does, DeepSeek-R1's reasoning comes back in
`reasoning_content`, the answer in `content`. A client that disconnects mid-stream cancels the
request, which aborts it in the engine.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import replace
from typing import Any, AsyncIterator, Literal, Sequence

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.actors.sampling_params import InvalidRequestError, SamplingParams
from expertmesh.cluster.auth import token_matches
from expertmesh.cluster.router.dispatcher import Delta, Dispatcher
from expertmesh.cluster.router.errors import RouterError
from expertmesh.cluster.router.frontend import Frontend, PreparedRequest

log = logging.getLogger(__name__)

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "suffix")


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # Extensions (vLLM/SGLang spell them the same way).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Base):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    separate_reasoning: bool = True
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Base):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


def _sampling(req: _Base, max_tokens: int | None, logprobs: int, defaults: SamplingParams,
              logprobs_field: str = "logprobs") -> tuple[SamplingParams, bool]:
    """The request's sampling fields over the served defaults; whether max_tokens was given."""
    for name in UNSUPPORTED:
        if (req.model_extra or {}).get(name) not in (None, [], {}):
            raise RouterError.invalid(name, "not supported by this server")
    if req.n != 1:
        raise RouterError.invalid("n", f"only n=1 is supported, got {req.n}")
    sp = replace(defaults, stop=[], stop_token_ids=[])
    given = max_tokens is not None
    if given:
        sp.max_tokens = max_tokens
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            setattr(sp, name, value)
    sp.stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sp.stop_token_ids = list(req.stop_token_ids or [])
    sp.ignore_eos = req.ignore_eos
    sp.logprobs = logprobs
    try:
        sp.validate()
    except InvalidRequestError as exc:
        if exc.field == "logprobs":  # the count is the client's top_logprobs on chat
            raise RouterError.invalid(logprobs_field, str(exc).split(": ", 1)[-1]) from None
        raise RouterError.from_invalid_request(exc) from None
    return sp, given


def _error(exc: RouterError, rid: str) -> JSONResponse:
    return JSONResponse(exc.openai_body(), status_code=exc.http_status, headers={"x-request-id": rid})


class BodyLimit:
    """ASGI wrapper in front of the app: a body over the limit is refused with 413 before it is
    read (Content-Length) or as soon as the bytes read pass the limit (chunked), so no request
    makes the router buffer more than the limit."""

    def __init__(self, app: Any, frontend: Frontend) -> None:
        self.app, self.frontend = app, frontend

    def __getattr__(self, name: str) -> Any:  # the FastAPI app's attributes (routes, state, ...)
        return getattr(self.app, name)

    async def _refuse(self, size: str, scope: dict, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        limit = self.frontend.max_request_bytes
        exc = RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request: {size} bytes is over the limit of {limit} bytes (router.max_request_bytes)")
        await _too_large(exc, rid)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.frontend.max_request_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > limit:
                return await self._refuse(declared.decode(), scope, receive, send)
            return await self.app(scope, receive, send)  # the server holds the body to its length
        buffered, seen = [], 0
        while True:  # chunked: read up to the limit, then hand the app what was read
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > limit:
                return await self._refuse(f"over {limit}", scope, receive, send)
            if not message.get("more_body"):
                break

        async def replay() -> dict:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


def _field_path(loc: Sequence[Any]) -> str:
    """pydantic's loc as the client spells the field: messages[0].role."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _too_large(exc: RouterError, rid: str) -> JSONResponse:
    body = exc.openai_body()
    body["error"].update(type="invalid_request_error", code="request_too_large", param=None)
    return JSONResponse(body, status_code=413, headers={"x-request-id": rid})


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _usage(d: Delta) -> dict[str, Any]:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": d.cached_tokens}}


def build_app(frontend: Frontend, dispatcher: Dispatcher, auth_token: str | None = None,
              default_timeout_s: float | None = None) -> "BodyLimit":
    app = FastAPI(title="expertmesh", docs_url=None, redoc_url=None)
    created = int(time.time())

    def token_of(tid: int) -> str:
        return frontend.tokenizer.decode([tid])

    def chat_logprobs(d: Delta) -> dict[str, Any] | None:
        if not d.logprobs:
            return None
        return {"content": [{"token": token_of(lp.token_id), "logprob": lp.logprob,
                             "top_logprobs": [{"token": token_of(t.token_id), "logprob": t.logprob} for t in lp.top]}
                            for lp in d.logprobs]}

    @app.middleware("http")
    async def auth_and_request_id(request: Request, call_next):
        given = request.headers.get("x-request-id") or ""
        request.state.rid = given[:frontend.limits.request_id_chars] or uuid.uuid4().hex
        rid = request.state.rid
        if auth_token and request.url.path.startswith("/v1/"):
            if not token_matches(request.headers.get("authorization"), auth_token):
                return _error(RouterError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"), rid)
        try:
            frontend.limits.check_request_id(given)
        except RouterError as exc:  # not echoed back: the id is what is wrong
            request.state.rid = uuid.uuid4().hex
            return _error(exc, request.state.rid)
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.rid
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        rid = getattr(request.state, "rid", "")
        if first.get("type") == "json_invalid":  # loc is a byte offset, not a field
            offset = next((p for p in first["loc"] if isinstance(p, int)), None)
            at = f" (at byte {offset})" if offset is not None else ""
            err = RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not valid JSON{at}")
            return _error(err, rid)
        if tuple(first["loc"]) == ("body",):  # the body as a whole: empty, or not an object
            what = "is empty" if first.get("type") == "missing" else "is not a JSON object"
            return _error(RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"the request body {what}"), rid)
        return _error(RouterError.invalid(_field_path(first["loc"]), first["msg"]), rid)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own refusals (an undecodable body, an unknown route) in OpenAI's error object."""
        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                405: grpc.StatusCode.UNIMPLEMENTED}.get(exc.status_code, grpc.StatusCode.INVALID_ARGUMENT)
        message = "the request body could not be decoded (send UTF-8 JSON)" if exc.status_code == 400 else str(exc.detail)
        body = RouterError(code, message).openai_body()
        return JSONResponse(body, status_code=exc.status_code, headers={"x-request-id": getattr(request.state, "rid", "")})

    @app.get("/health")
    async def healthz() -> JSONResponse:
        ok = bool(dispatcher.replicas.available())
        return JSONResponse({"status": "ok" if ok else "no replica"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": frontend.model_name, "object": "model", "created": created,
                                            "owned_by": "expertmesh",
                                            "max_model_len": frontend.info.max_context_length,
                                            "default_sampling": frontend.default_sampling_fields()}]}

    async def run(request: Request, prepared: PreparedRequest, stream: bool, kind: Literal["chat", "text"],
                  include_usage: bool, echo_prompt: str = "") -> Any:
        rid = request.state.rid
        oid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        deltas = dispatcher.stream(prepared, f"{rid}-{uuid.uuid4().hex[:8]}", default_timeout_s)
        head = {"id": oid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": frontend.model_name}

        if not stream:
            text, reasoning, last, lps = [echo_prompt], [], None, []
            try:
                async with aclosing(deltas):
                    async for d in deltas:
                        text.append(d.text)
                        reasoning.append(d.reasoning)
                        lps.extend(d.logprobs)
                        last = d
            except RouterError as exc:
                return _error(exc, rid)
            assert last is not None
            last.logprobs = lps
            if kind == "chat":
                msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
                if prepared.split_reasoning:
                    msg["reasoning_content"] = "".join(reasoning)
                choice = {"index": 0, "message": msg, "logprobs": chat_logprobs(last), "finish_reason": last.finish_reason}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": last.finish_reason}
                obj = "text_completion"
            return JSONResponse({**head, "object": obj, "choices": [choice], "usage": _usage(last)},
                                headers={"x-request-id": rid})

        # Streaming: fetch the first delta before answering, so routing/queue errors get a status code.
        it = deltas.__aiter__()
        try:
            first = await it.__anext__()
        except RouterError as exc:
            await deltas.aclose()
            return _error(exc, rid)
        except StopAsyncIteration:
            first = None

        def chunk(d: Delta) -> dict[str, Any]:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if d.reasoning:
                    delta["reasoning_content"] = d.reasoning
                if d.text:
                    delta["content"] = d.text
                choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(d), "finish_reason": d.finish_reason}
            else:
                choice = {"index": 0, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
            return {**head, "choices": [choice]}

        async def body() -> AsyncIterator[bytes]:
            async with aclosing(deltas):
                if kind == "chat":
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                elif echo_prompt:
                    yield _sse({**head, "choices": [{"index": 0, "text": echo_prompt, "logprobs": None,
                                                     "finish_reason": None}]})
                last = first
                try:
                    if first is not None:
                        yield _sse(chunk(first))
                    async for d in it:
                        last = d
                        yield _sse(chunk(d))
                except RouterError as exc:
                    yield _sse(exc.openai_body())
                else:
                    if include_usage and last is not None:
                        yield _sse({**head, "choices": [], "usage": _usage(last)})
                yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"x-request-id": rid, "cache-control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        try:
            dispatcher.check_admission()  # overload: refused before any tokenizing
            frontend.check_model(req.model)
            if req.response_format and req.response_format.get("type") not in (None, "text"):
                raise RouterError.invalid("response_format", "only type 'text' is supported")
            if req.top_logprobs and not req.logprobs:
                raise RouterError.invalid("top_logprobs", "needs logprobs: true")
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            sp, given = _sampling(req, max_tokens, (req.top_logprobs or 1) if req.logprobs else 0,
                                  frontend.sampling_defaults, "top_logprobs")
            frontend.limits.check_messages(len(req.messages))
            messages = [{"role": m.role, "content": _content_text(m.content, f"messages[{i}].content")}
                        for i, m in enumerate(req.messages)]
            size = sum(len(m["content"]) for m in messages)
            ids = await frontend.off_loop.run(size, lambda: frontend.encode(frontend.chat_prompt(messages)))
            frontend.check_prompt(ids, sp, given, "messages", field)
        except RouterError as exc:
            return _error(exc, request.state.rid)
        split = req.separate_reasoning
        prepared = PreparedRequest(ids, sp, split, split and frontend.starts_in_reasoning(ids),
                                   req.top_logprobs or 0)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return await run(request, prepared, req.stream, "chat", include_usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        try:
            dispatcher.check_admission()  # overload: refused before any tokenizing
            frontend.check_model(req.model)
            if req.logprobs:
                raise RouterError.invalid("logprobs", "not supported on /v1/completions; use chat")
            sp, given = _sampling(req, req.max_tokens, 0, frontend.sampling_defaults)
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                if len(prompt) != 1:
                    raise RouterError.invalid("prompt", "only one prompt per request is supported")
                prompt = prompt[0]
            ids = await frontend.off_loop.run(len(prompt), frontend.encode, prompt, "prompt") \
                if isinstance(prompt, str) else list(prompt)
            # OpenAI's legacy completions default to 16 tokens (so do vLLM's); chat gets the rest
            frontend.check_prompt(ids, sp, given, "prompt", "max_tokens", unset_max_tokens=16)
        except RouterError as exc:
            return _error(exc, request.state.rid)
        echo = (prompt if isinstance(prompt, str) else frontend.tokenizer.decode(ids)) if req.echo else ""
        prepared = PreparedRequest(ids, sp, False, False)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return await run(request, prepared, req.stream, "text", include_usage, echo)

    return BodyLimit(app, frontend)


def _content_text(content: str | list[dict[str, Any]] | None, field: str) -> str:
    """OpenAI content is a string or a list of parts; only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RouterError.invalid(f"{field}[{i}]", "only text parts are supported")
        parts.append(part["text"])
    return "".join(parts)
