"""One error type for both front ends: a gRPC status plus, for bad requests, the field at fault.
The OpenAI-compatible HTTP API maps the status to an HTTP code and OpenAI's error body."""
from __future__ import annotations

import grpc

from expertmesh.actors.sampling_params import InvalidRequestError

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class RouterError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def invalid(cls, field: str, message: str) -> "RouterError":
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)

    @classmethod
    def from_invalid_request(cls, exc: InvalidRequestError) -> "RouterError":
        return cls(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, (500, "server_error"))[0]

    def openai_body(self) -> dict:
        kind = HTTP_STATUS.get(self.code, (500, "server_error"))[1]
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": self.code.name.lower()}}
