"""The replica side of the router↔replica hop: expertmesh.v1.EngineService over an AsyncEngine.

Each engine replica serves this on its own host:port (127.0.0.1:ephemeral locally) and registers
that address with the replica registry. The router sends token ids and gets detokenized deltas
back. A cancelled stream (router/client cancel, deadline) aborts the request in the engine, which
frees its KV. A full waiting queue answers RESOURCE_EXHAUSTED so the router can try elsewhere; a
draining replica answers UNAVAILABLE for the same reason.

The proto <-> Python conversions live in cluster/wire.py, shared with the router.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expertmesh.actors.sampling_params import InvalidRequestError, SamplingParams
from expertmesh.cluster.decoding import TolerantDecoding
from expertmesh.cluster.engine.types import EngineRequest, LoadInfo
from expertmesh.cluster.wire import load_to_proto, output_to_proto, sampling_from_proto
from expertmesh.v1 import engine_pb2, engine_pb2_grpc, generate_pb2

if TYPE_CHECKING:  # the engine imports torch; this module must stay light for the router
    from expertmesh.cluster.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

def _served_dtype(engine: Any, cfg: Any) -> str:
    """The dtype the ranks compute in (the engine's config), not the checkpoint's storage dtype."""
    inner = getattr(engine, "engine", engine)  # AsyncEngine wraps the Engine
    return str(getattr(getattr(inner, "config", None), "dtype", None) or cfg.torch_dtype)


def model_info_from_engine(engine: Any) -> generate_pb2.ModelInfo:
    cfg = engine.model_config
    tok = getattr(engine, "tokenizer", None)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    template = getattr(tok, "chat_template", None) or ""
    return generate_pb2.ModelInfo(
        id=engine.model_name, architecture="DeepseekV3ForCausalLM", vocab_size=cfg.vocab_size,
        max_context_length=cfg.max_position_embeddings, num_hidden_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_shared_experts=cfg.n_shared_experts,
        dtype=_served_dtype(engine, cfg), reasoning_model="<think>" in template,
        eos_token_ids=[e for e in eos if e is not None],
        **_defaults(getattr(engine, "engine", engine)),
    )


def _defaults(inner: Any) -> dict[str, Any]:
    """ModelInfo's defaults: what an unset field means on this replica."""
    gd = getattr(inner, "generation_defaults", None)
    if gd is None:
        return {}
    return dict(default_sampling=generate_pb2.SamplingParams(**gd.set_fields()),
                default_max_tokens=inner.config.default_max_tokens, max_sequence_tokens=inner.max_sequence_tokens)


# ---- servicer ---------------------------------------------------------------------------------
def _engine_max_waiting(engine: Any) -> int:
    try:
        return int(engine.engine.config.scheduler.max_waiting_requests)
    except AttributeError:
        return 0


def _engine_max_running(engine: Any) -> int:
    """Running slots over all ranks (max_running_requests is per rank); 0: unknown."""
    try:
        inner = engine.engine
        return int(inner.config.scheduler.max_running_requests) * int(inner.config.ep_size)
    except AttributeError:
        return int(getattr(engine, "max_running", 0) or 0)



class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    def __init__(self, engine: "AsyncEngine", replica_id: str, max_waiting: int = 0,
                 tokenizer_path: str = "") -> None:
        self.engine = engine
        self.replica_id = replica_id
        # Reported in GetLoad (the engine enforces it); 0: unlimited / unknown.
        self.max_waiting = max_waiting or _engine_max_waiting(engine)
        self.max_running = _engine_max_running(engine)
        self.tokenizer_path = tokenizer_path
        self.draining = False
        gd = getattr(getattr(engine, "engine", engine), "generation_defaults", None)
        self.sampling_defaults = gd.apply(SamplingParams()) if gd is not None else None

    def _load(self) -> LoadInfo:
        load = self.engine.load()
        load.replica_id = load.replica_id or self.replica_id
        return load

    def unavailable(self) -> str | None:
        """Why this replica takes no requests now: draining, or its expert-parallel group failed."""
        if self.draining:
            return f"replica {self.replica_id} is draining"
        failure = getattr(self.engine, "failure", lambda: None)()
        return f"replica {self.replica_id}: {failure}" if failure else None

    async def Generate(self, request: engine_pb2.EngineGenerateRequest,
                       context: aio.ServicerContext) -> AsyncIterator[engine_pb2.EngineGenerateResponse]:
        refused = self.unavailable()
        if refused:
            await context.abort(grpc.StatusCode.UNAVAILABLE, refused)
        try:
            sampling = sampling_from_proto(request.sampling, self.sampling_defaults, prefix="sampling.")
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: must not be empty")
        req = EngineRequest(request_id=request.request_id or uuid.uuid4().hex,
                            prompt_token_ids=list(request.prompt_token_ids), sampling=sampling,
                            trace_context=dict(request.trace_context) or None,
                            resume_token_ids=list(request.resume_token_ids),
                            resume_text_chars=request.resume_text_chars)
        stream = self.engine.generate(req)
        top_n = request.sampling.top_logprobs
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield output_to_proto(out, top_n)
                if finished:
                    break
        except InvalidRequestError as exc:
            finished = True
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - every engine failure becomes a status, not UNKNOWN
            from expertmesh.cluster.engine.engine import QueueFullError  # loaded already on a replica

            if isinstance(exc, QueueFullError):
                finished = True
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"replica {self.replica_id}: {exc}")
            log.exception("request %s failed in the engine", req.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"engine error on {self.replica_id}: {exc}")
        finally:
            if not finished:  # cancelled by the caller or its deadline: free the request's KV
                log.debug("request %s cancelled; aborting in the engine", req.request_id)
                await asyncio.shield(self._abort_quietly(stream, req.request_id))

    async def _abort_quietly(self, stream: Any, request_id: str) -> None:
        try:
            await stream.aclose()
            await self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - aborting an already-finished request must not raise out
            log.exception("abort of %s failed", request_id)

    async def Abort(self, request: engine_pb2.AbortRequest, context: aio.ServicerContext) -> engine_pb2.AbortResponse:
        found = await self.engine.abort(request.request_id)
        return engine_pb2.AbortResponse(found=bool(found))

    async def GetLoad(self, request: engine_pb2.EngineLoadRequest, context: aio.ServicerContext) -> generate_pb2.ReplicaLoad:
        return load_to_proto(self._load(), self.max_waiting, healthy=self.unavailable() is None,
                             max_running=self.max_running)

    async def Health(self, request: engine_pb2.HealthRequest, context: aio.ServicerContext) -> engine_pb2.HealthResponse:
        return engine_pb2.HealthResponse(serving=self.unavailable() is None, replica_id=self.replica_id)

    async def GetInfo(self, request: engine_pb2.EngineInfoRequest, context: aio.ServicerContext) -> engine_pb2.EngineInfo:
        return engine_pb2.EngineInfo(replica_id=self.replica_id, model=model_info_from_engine(self.engine),
                                     tokenizer_path=self.tokenizer_path, max_waiting=self.max_waiting)


class EngineServer:
    """Lifecycle of one replica's EngineService server (plus grpc.health.v1)."""

    def __init__(self, engine: "AsyncEngine", host: str = "127.0.0.1", port: int = 0,
                 replica_id: str | None = None, max_waiting: int = 0, tokenizer_path: str = "",
                 auth_token: str | None = None) -> None:
        self.host, self.port = host, port
        self.auth_token = auth_token  # set: calls need it (the app's internal credential); health stays open
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:8]}"
        self.servicer = EngineServicer(engine, self.replica_id, max_waiting, tokenizer_path)
        self.health = health.aio.HealthServicer()
        self._server: aio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> str:
        from expertmesh.cluster.auth import BearerTokenInterceptor

        interceptors = [BearerTokenInterceptor(self.auth_token)] if self.auth_token else []
        server = aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        # A request that does not parse (non-UTF-8 in a string field) is INVALID_ARGUMENT naming
        # the field, as at the router, not UNKNOWN "DecodeError" (cluster/decoding.py).
        TolerantDecoding(engine_pb2.DESCRIPTOR).add_servicer(
            engine_pb2_grpc.add_EngineServiceServicer_to_server, self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("expertmesh.v1.EngineService", health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info("EngineService of %s serving on %s", self.replica_id, self.address)
        return self.address

    async def drain(self) -> None:
        """Refuse new requests (the router retries them elsewhere); running ones continue."""
        self.servicer.draining = True
        engine_drain = getattr(self.servicer.engine, "drain", None)
        if engine_drain is not None:
            engine_drain()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
