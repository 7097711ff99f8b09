"""The router's request limits, resolved once against the served model, checked by both APIs.

Limits OpenAI's API has none for, so a careless or hostile client cannot make the router buffer,
tokenize or log without bound: the request's size, the prompt's bytes and tokens, the number of
chat messages, the request id's length. Each refusal names the field and the config key that
sets the limit, so an operator knows what to raise.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from expertmesh.cluster.router.errors import RouterError

BYTES_PER_CONTEXT_TOKEN = 16  # default size limits: a prompt that fits the context always fits
MIN_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_MESSAGES = 4096
DEFAULT_MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class Limits:
    request_bytes: int  # router.max_request_bytes: the whole request (gRPC message, HTTP body)
    prompt_bytes: int  # router.max_prompt_bytes: prompt text, UTF-8, before it is tokenized
    prompt_tokens: int  # router.max_prompt_tokens: at most the context less one (room to generate)
    messages: int  # router.max_messages: chat messages per request
    request_id_chars: int  # router.max_request_id_chars: the client's x-request-id

    @classmethod
    def resolve(cls, context_length: int, request_bytes: int | None = None, prompt_bytes: int | None = None,
                prompt_tokens: int | None = None, messages: int | None = None,
                request_id_chars: int | None = None) -> "Limits":
        """Unset limits derived from the model's context length."""
        req = request_bytes or max(MIN_REQUEST_BYTES, BYTES_PER_CONTEXT_TOKEN * context_length)
        most_tokens = max(1, context_length - 1)
        return cls(request_bytes=req, prompt_bytes=prompt_bytes or req,
                   prompt_tokens=min(prompt_tokens or most_tokens, most_tokens),
                   messages=messages or DEFAULT_MAX_MESSAGES,
                   request_id_chars=request_id_chars or DEFAULT_MAX_REQUEST_ID_CHARS)

    def check_request_bytes(self, size: int) -> None:
        if size > self.request_bytes:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"request: {size} bytes is over the limit of {self.request_bytes} bytes "
                              "(router.max_request_bytes)", "request")

    def check_prompt_bytes(self, size: int, field: str) -> None:
        if size > self.prompt_bytes:
            raise RouterError.invalid(field, f"{size} bytes of prompt text is over the limit of {self.prompt_bytes} "
                                             "bytes (router.max_prompt_bytes)")

    def check_prompt_tokens(self, count: int, field: str, context_length: int) -> None:
        if count > self.prompt_tokens:
            raise RouterError.invalid(field, f"{count} prompt tokens is over the limit of {self.prompt_tokens} "
                                             f"(router.max_prompt_tokens; the model's context is {context_length} tokens)")

    def check_messages(self, count: int, field: str = "messages") -> None:
        if count > self.messages:
            raise RouterError.invalid(field, f"{count} messages is over the limit of {self.messages} "
                                             "(router.max_messages)")

    def check_request_id(self, rid: str, field: str = "x-request-id") -> None:
        if len(rid) > self.request_id_chars:
            raise RouterError.invalid(field, f"{len(rid)} characters is over the limit of {self.request_id_chars} "
                                             "(router.max_request_id_chars)")
        if not (rid.isascii() and rid.isprintable()):
            raise RouterError.invalid(field, "must be printable ASCII")
