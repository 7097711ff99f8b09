"""The router's public gRPC server: expertmesh.v1.Generation, grpc.health.v1 and reflection,
and the lifecycle of everything the router runs (replica set, registry watcher, HTTP API)."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expertmesh.cluster.auth import BearerTokenInterceptor, server_credentials
from expertmesh.cluster.decoding import TolerantDecoding, grpc_receive_cap
from expertmesh.cluster.router.config import RouterConfig
from expertmesh.cluster.router.dispatcher import Delta, Dispatcher
from expertmesh.cluster.router.errors import RouterError
from expertmesh.cluster.router.frontend import Frontend, PreparedRequest
from expertmesh.cluster.tokenizer import load_tokenizer
from expertmesh.cluster.router.policies import RoutingPolicy, make_policy
from expertmesh.cluster.router.registry import (RayRegistrySource, RegistryRef, RegistryWatcher, ReplicaSource,
                                                StaticReplicaSource)
from expertmesh.cluster.router.replicas import ReplicaSet
from expertmesh.cluster.wire import FINISH_TO_PROTO
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from expertmesh.cluster.telemetry.tracing import context_from_metadata, metadata_for
from expertmesh.v1 import engine_pb2, generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)

def _tracer():
    return trace.get_tracer("expertmesh.router")


SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
PASSTHROUGH_METADATA = ("traceparent", "tracestate")
OVERLOADED = "all replicas are at their queue limit; retry later"


def request_id_of(context: aio.ServicerContext) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The client's x-request-id ("" when none) and the metadata forwarded to the replica."""
    rid, forward = "", []
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            rid = value
        elif key in PASSTHROUGH_METADATA:
            forward.append((key, value))
    return rid, tuple(forward)


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend, dispatcher: Dispatcher, default_timeout_s: float | None = None) -> None:
        self.frontend = frontend
        self.dispatcher = dispatcher
        self.default_timeout_s = default_timeout_s
        self.started = int(time.time())

    def _timeout(self, context: aio.ServicerContext) -> float | None:
        left = context.time_remaining()
        if left is None or left > 1e8:  # no client deadline
            return self.default_timeout_s
        return left if self.default_timeout_s is None else min(left, self.default_timeout_s)

    async def _respond(self, prepare, request, context: aio.ServicerContext) -> AsyncIterator[generate_pb2.GenerateResponse]:
        # Overload first: a refusal is the first thing decided, before any other work (no request
        # id check, no parsing of the prompt, no span, no replica call), and answered with a status
        # rather than abort() (no exception through the stream layers).
        admission = self.dispatcher.admit()
        if admission is None:
            rid = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), "")
            ok = isinstance(rid, str) and 0 < len(rid) <= self.frontend.limits.request_id_chars
            context.set_trailing_metadata((("x-request-id", rid if ok else uuid.uuid4().hex),))
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(OVERLOADED)
            return
        try:
            rid, forward = request_id_of(context)
            try:
                self.frontend.limits.check_request_id(rid)
            except RouterError as exc:  # not echoed back: the id is what is wrong
                await context.abort(exc.code, exc.message)
            rid = rid or uuid.uuid4().hex
            async for msg in self._serve(prepare, request, context, rid, forward, admission):
                yield msg
        finally:
            admission.release()  # no-op once the request reached a replica

    async def _serve(self, prepare, request, context: aio.ServicerContext, rid: str,
                     forward: tuple[tuple[str, str], ...], admission) -> AsyncIterator[generate_pb2.GenerateResponse]:
        await context.send_initial_metadata((("x-request-id", rid),))
        model = self.frontend.model_name
        replica_id = ""
        # The request's trace: continued from the client's traceparent; the replica continues ours.
        # (spans are passed explicitly, never made current: this generator yields between them)
        parent = context_from_metadata(context.invocation_metadata())
        span = _tracer().start_span("router.Generate", context=parent, kind=SpanKind.SERVER,
                                    attributes={"expertmesh.request_id": rid})
        here = trace.set_span_in_context(span)
        forward = tuple(kv for kv in forward if kv[0] not in PASSTHROUGH_METADATA) + tuple(metadata_for(here))
        stream_span = None
        try:
            prepared: PreparedRequest = await self.frontend.prepare_async(prepare, request)
            # An engine id of our own: a client's x-request-id need not be unique.
            engine_rid = f"{rid}-{uuid.uuid4().hex[:8]}"
            stream = self.dispatcher.stream(prepared, engine_rid, self._timeout(context), forward, trace_parent=here,
                                            admission=admission)
            async with aclosing(stream):
                async for d in stream:
                    if stream_span is None:
                        stream_span = _tracer().start_span("stream", context=here)
                    replica_id = d.replica_id
                    yield _to_response(d, rid, model)
        except RouterError as exc:
            span.set_status(Status(StatusCode.ERROR, exc.message))
            context.set_trailing_metadata((("x-request-id", rid), ("x-replica-id", replica_id)))
            await context.abort(exc.code, exc.message)
        finally:
            if stream_span is not None:
                stream_span.end()
            span.set_attribute("expertmesh.replica_id", replica_id)
            span.end()
        context.set_trailing_metadata((("x-request-id", rid), ("x-replica-id", replica_id)))

    # grpc.aio recognises streaming handlers by being async generator functions themselves.
    async def Generate(self, request: generate_pb2.GenerateRequest, context: aio.ServicerContext):
        async for msg in self._respond(self.frontend.prepare_generate, request, context):
            yield msg

    async def Chat(self, request: generate_pb2.ChatRequest, context: aio.ServicerContext):
        async for msg in self._respond(self.frontend.prepare_chat, request, context):
            yield msg

    async def ListModels(self, request, context: aio.ServicerContext) -> generate_pb2.ListModelsResponse:
        info = self.frontend.info
        return generate_pb2.ListModelsResponse(models=[generate_pb2.ModelCard(
            id=info.id, owned_by="expertmesh", created=self.started, max_context_length=info.max_context_length)])

    async def GetModelInfo(self, request: generate_pb2.GetModelInfoRequest, context: aio.ServicerContext) -> generate_pb2.ModelInfo:
        try:
            self.frontend.check_model(request.model)
        except RouterError as exc:
            await context.abort(exc.code, exc.message)
        return self.frontend.info

    async def GetLoad(self, request, context: aio.ServicerContext) -> generate_pb2.GetLoadResponse:
        return await self.dispatcher.load()


def _to_response(d: Delta, rid: str, model: str) -> generate_pb2.GenerateResponse:
    msg = generate_pb2.GenerateResponse(request_id=rid, text=d.text, reasoning=d.reasoning, token_ids=d.token_ids,
                                        logprobs=d.logprobs, model=model)
    if d.finish_reason is not None:
        msg.finish_reason = FINISH_TO_PROTO.get(d.finish_reason, generate_pb2.FINISH_REASON_ERROR)
        msg.usage.prompt_tokens = d.prompt_tokens
        msg.usage.completion_tokens = d.completion_tokens
        msg.usage.total_tokens = d.prompt_tokens + d.completion_tokens
        msg.usage.cached_tokens = d.cached_tokens
    return msg


class RouterServer:
    """Everything the router runs, started and stopped together, all in one event loop."""

    def __init__(self, config: RouterConfig, source: ReplicaSource | None = None,
                 frontend: Frontend | None = None, policy: RoutingPolicy | None = None) -> None:
        self.config = config
        if source is None:
            source = (StaticReplicaSource(config.replicas) if config.replicas
                      else RayRegistrySource(ref=RegistryRef(config.app, config.ray_namespace)))
        self.source = source
        self.policy = policy or make_policy(config.policy, config.cache_aware.to_policy_config())
        self.replicas = ReplicaSet(probe_interval_s=config.probe_interval_s,
                                   on_removed=self.policy.remove_replica, on_change=self._on_replicas_changed)
        self.watcher = RegistryWatcher(source, self.replicas, config.registry_poll_s)
        self.dispatcher = Dispatcher(self.replicas, self.policy, config.max_attempts, config.max_resumes,
                                     config.resume_wait_s)
        self.frontend = frontend
        self.health = health.aio.HealthServicer()
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._server: aio.Server | None = None
        self._http = None
        self._http_task: asyncio.Task | None = None
        self._serving: bool | None = None
        self._health_tasks: set[asyncio.Task] = set()

    @property
    def grpc_address(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"http://{self.config.host}:{self.http_port}"

    def _on_replicas_changed(self, replicas: ReplicaSet) -> None:
        serving = bool(replicas.available())
        if serving == self._serving or self._server is None:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        loop = asyncio.get_running_loop()
        for name in ("", SERVICE_NAME):
            task = loop.create_task(self.health.set(name, status))
            self._health_tasks.add(task)  # the loop keeps only weak references
            task.add_done_callback(self._health_tasks.discard)

    async def _first_replica_info(self) -> engine_pb2.EngineInfo:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            for replica in self.replicas.available():
                try:
                    return await replica.stub.GetInfo(engine_pb2.EngineInfoRequest(), timeout=5.0)
                except grpc.RpcError as exc:
                    log.info("replica %s not ready: %s", replica.replica_id, exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no engine replica answered within {self.config.startup_timeout_s:.0f} s")
            await asyncio.sleep(0.2)
            await self.watcher.poll_once()

    async def start(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self.policy.warm)
        await self.watcher.start()
        self.replicas.start()
        if self.frontend is None:
            info = await self._first_replica_info()
            tokenizer_path = cfg.tokenizer_path or info.tokenizer_path
            if not tokenizer_path:
                raise RuntimeError("tokenizer_path: not configured and the replica reports none")
            tokenizer = await asyncio.to_thread(load_tokenizer, tokenizer_path)
            self.frontend = Frontend(tokenizer, info.model, cfg.limits(info.model.max_context_length))
        interceptors = [BearerTokenInterceptor(cfg.auth_token)] if cfg.auth_token else []
        # An oversized request gets our INVALID_ARGUMENT naming the size and the limit, checked on
        # the raw bytes before parsing; grpc-core's own cap (RESOURCE_EXHAUSTED, which reads like
        # "queue full, retry") sits 16x above it and bounds what one call may buffer (decoding.py).
        limit = self.frontend.max_request_bytes
        server = aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", grpc_receive_cap(limit))])
        decoding = TolerantDecoding(generate_pb2.DESCRIPTOR, max_bytes=limit, limit_key="router.max_request_bytes")
        decoding.add_servicer(  # undecodable or oversized requests name their field
            generate_pb2_grpc.add_GenerationServicer_to_server,
            GenerationServicer(self.frontend, self.dispatcher, cfg.request_timeout_s), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        bind = f"{cfg.host}:{cfg.grpc_port}"
        if cfg.tls_cert_file:
            creds = server_credentials(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
            self.grpc_port = server.add_secure_port(bind, creds)
        else:
            self.grpc_port = server.add_insecure_port(bind)
        await server.start()
        self._server = server
        self._on_replicas_changed(self.replicas)
        log.info("router serving %s on %s (%s, policy %s)", SERVICE_NAME, self.grpc_address,
                 "TLS" if cfg.tls_cert_file else "plaintext", self.policy.name)
        if cfg.http_port is not None:
            await self._start_http()

    async def _start_http(self) -> None:
        import uvicorn

        from expertmesh.cluster.router.openai_http import build_app

        cfg = self.config
        app = build_app(self.frontend, self.dispatcher, auth_token=cfg.auth_token,
                        default_timeout_s=cfg.request_timeout_s)
        ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.http_port, log_level="warning", lifespan="off",
                              ssl_certfile=cfg.tls_cert_file, ssl_keyfile=cfg.tls_key_file)
        self._http = uvicorn.Server(ucfg)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises the bind error
                raise RuntimeError("HTTP server exited at start")
            await asyncio.sleep(0.02)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        log.info("router serving the OpenAI-compatible API on %s", self.http_address)

    async def stop(self, grace: float | None = 2.0) -> None:
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                await self._http_task
            self._http = None
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        await self.watcher.stop()
        await self.replicas.stop()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
