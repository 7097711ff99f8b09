"""Bearer-token auth and TLS: the router's public servers and the replicas' internal EngineService.

The gRPC interceptor rejects calls without `authorization: Bearer <token>` with UNAUTHENTICATED
before any handler runs. Health checks stay open so load balancers and Kubernetes probes work
without the token. Tokens are compared in constant time.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from grpc import aio

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def token_matches(header_value: str | None, token: str) -> bool:
    if not header_value:
        return False
    scheme, _, value = header_value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def deny_unary(request, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kw)


class BearerTokenInterceptor(aio.ServerInterceptor):
    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        if not token:
            raise ValueError("auth.token: must be non-empty when auth is on")
        self._token = token
        self._open = open_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if token_matches(header if isinstance(header, str) else None, self._token):
            return handler
        reason = "missing bearer token" if header is None else "invalid bearer token"
        log.info("rejected %s: %s", details.method, reason)
        return _deny_handler(handler, f"{reason}: send metadata 'authorization: Bearer <token>'")


def server_credentials(cert_file: str | Path, key_file: str | Path,
                       client_ca_file: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS for the public server; with client_ca_file, clients must present a certificate (mTLS)."""
    cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class _BearerMetadata:
    """Adds `authorization: Bearer <token>` to every call of a client channel."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        md = aio.Metadata(*(details.metadata or ()), self._md)
        return aio.ClientCallDetails(details.method, details.timeout, md, details.credentials,
                                     details.wait_for_ready)


class BearerUnaryUnary(_BearerMetadata, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class BearerUnaryStream(_BearerMetadata, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def bearer_client_interceptors(token: str | None) -> list:
    """Client interceptors that send `token` on every unary and server-streaming call (none: [])."""
    return [BearerUnaryUnary(token), BearerUnaryStream(token)] if token else []
