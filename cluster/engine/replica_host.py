"""One engine replica as a plain object: the engine and its expert-parallel group, the
EngineService it serves, its registration (with heartbeat) in its app's registry, telemetry, and
the drain. Serve's EngineReplica deployment is a thin shell over it (cluster/serve/replica.py), as
RankActor is over ModelWorker; tests drive it without Serve."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ReplicaSettings:
    """What a replica needs besides its engine's own config (mapped from the deploy config)."""

    replica_id: str
    app: str = "expertmesh"
    namespace: str = "expertmesh"
    served_model_name: str | None = None
    max_waiting: int = 64
    host: str = "127.0.0.1"
    telemetry_metrics: bool = True
    service_name: str = "expertmesh"
    otlp_endpoint: str | None = None
    trace_decode_every: int = 16
    expert_load_every_s: float = 2.0  # a Ray call per rank: not every step
    drain_timeout_s: float = 120.0
    # A broken group fails the replica as a unit: exit the process once the failed requests' last
    # messages are out, so the supervisor (Serve) replaces it at once instead of after its health
    # checks fail several times (seconds instead of ~25 s here). Off for in-process use and tests.
    exit_on_group_failure: bool = False
    extra_metadata: dict[str, str] = field(default_factory=dict)


class ReplicaHost:
    """Built in a worker thread (`create`), then `start`ed on the serving event loop."""

    def __init__(self, engine: Any, settings: ReplicaSettings, registry: Any = None) -> None:
        from expertmesh.cluster.engine.async_engine import AsyncEngine
        from expertmesh.cluster.engine.grpc_service import EngineServer
        from expertmesh.cluster.telemetry.metrics import EngineMetrics
        from expertmesh.cluster.telemetry.tracing import setup_tracing

        self.settings = settings
        self.replica_id = settings.replica_id
        name = settings.served_model_name or engine.model_name
        engine.model_name = name
        self.metrics = EngineMetrics(self.replica_id, name) if settings.telemetry_metrics else None
        tracer = setup_tracing(settings.service_name, settings.otlp_endpoint)
        self.engine = AsyncEngine(engine, on_step=self._on_step, tracer=tracer,
                                  trace_decode_every=settings.trace_decode_every)
        self.server = EngineServer(self.engine, host=settings.host, port=0, replica_id=self.replica_id,
                                   max_waiting=settings.max_waiting, tokenizer_path=str(engine.config.checkpoint))
        self.registry = registry  # a RegistryClient; None: made in start() for this app's registry
        self._last_expert_sample = 0.0
        self._rebuilds_seen = 0
        self._t0 = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._left_registry = False

    async def start(self) -> str:
        """Serves EngineService and registers it (then heart-beats). Returns the address."""
        from expertmesh.cluster.router.registry import RegistryClient, RegistryRef

        self._loop = asyncio.get_running_loop()
        if self.registry is None:
            self.registry = RegistryClient(self.replica_id, "", {}, ref=RegistryRef(self.settings.app,
                                                                                   self.settings.namespace))
        self.server.auth_token = await self.registry.internal_token()  # only this app's router gets in
        address = await self.server.start()
        ranks = [{k: v for k, v in r.items() if k != "read_tensor_names"} for r in self.engine.engine.executor.describe()]
        meta = {"model": self.engine.model_name, "pid": str(os.getpid()), "ranks": json.dumps(ranks),
                "started_s": f"{time.monotonic() - self._t0:.1f}", **self.settings.extra_metadata}
        self.registry.address, self.registry.metadata = address, {**meta, **self.registry.metadata}
        await self.registry.start()
        log.info("engine replica %s serving on %s", self.replica_id, address)
        return address

    def _on_step(self, engine: Any, outputs: Any) -> None:
        if self.metrics is not None:
            self.metrics.on_step(engine, outputs)
        if engine.failure() and not self._left_registry and self._loop is not None:
            # push, not poll: leave the registry the moment the group breaks (the routers resync on
            # its version change; the streams that were running resume on other replicas)
            self._left_registry = True
            log.error("replica %s: %s; leaving the registry", self.replica_id, engine.failure())
            asyncio.run_coroutine_threadsafe(self._leave_registry(), self._loop)
        rebuilds = getattr(engine.executor, "rebuilds", [])
        if self.registry is not None and len(rebuilds) != self._rebuilds_seen:
            # the group was rebuilt in place: new rank actors (names, pids) for `status`
            self._rebuilds_seen = len(rebuilds)
            ranks = [{k: v for k, v in r.items() if k != "read_tensor_names"} for r in engine.executor.describe()]
            self.registry.metadata["ranks"] = json.dumps(ranks)
            self.registry.metadata["rebuilds"] = json.dumps(rebuilds[-5:])
        now = time.monotonic()
        if now - self._last_expert_sample > self.settings.expert_load_every_s:
            self._last_expert_sample = now
            load = engine.executor.expert_load()
            if self.metrics is not None:
                self.metrics.record_expert_load(load)
            if self.registry is not None:  # for `expertmesh status`, on the next heartbeat
                self.registry.metadata["expert_load"] = json.dumps(load)
            eplb = getattr(engine.executor, "eplb_stats", None)
            if eplb is not None:
                stats = eplb()
                if self.metrics is not None:
                    self.metrics.record_eplb(stats)
                if self.registry is not None:  # and the ranks' slots, which rebalances change
                    self.registry.metadata["eplb"] = json.dumps(stats)
                    self.registry.metadata["ranks"] = json.dumps(
                        [{k: v for k, v in r.items() if k != "read_tensor_names"} for r in engine.executor.describe()])

    async def _leave_registry(self) -> None:
        try:
            await self.registry.stop(deregister=True)
        except Exception as exc:  # noqa: BLE001 - the TTL drops it anyway
            log.warning("could not deregister %s: %r", self.replica_id, exc)
        if self.settings.exit_on_group_failure:
            await asyncio.sleep(1.0)  # the failed streams' last messages reach the router first
            log.error("replica %s exits so that it is replaced: %s", self.replica_id, self.failure())
            logging.shutdown()
            os._exit(1)

    def load(self) -> Any:
        load = self.engine.load()
        if self.metrics is not None:
            self.metrics.set_gauges(load)
        return load

    def failure(self) -> str | None:
        """Why this replica cannot serve (a broken EP group fails the replica as a unit), or None."""
        return self.engine.failure()

    async def status(self) -> dict[str, Any]:
        load = self.engine.load()
        executor = self.engine.engine.executor
        expert_load = await asyncio.to_thread(executor.expert_load)
        return {
            "replica_id": self.replica_id, "address": self.server.address, "model": self.engine.model_name,
            "ranks": [{k: v for k, v in r.items() if k != "read_tensor_names"} for r in executor.describe()],
            "running": load.running, "waiting": load.waiting, "kv_used_tokens": load.kv_used_tokens,
            "kv_total_tokens": load.kv_total_tokens, "kv_usage": load.kv_usage, "cache_hit_rate": load.cache_hit_rate,
            "expert_load": expert_load,
            **({"eplb": executor.eplb_stats()} if hasattr(executor, "eplb_stats") else {}),
        }

    async def drain_and_stop(self) -> None:
        """Leave the registry, refuse new work, finish running requests, then stop the group."""
        try:
            if self.registry is not None and not self._left_registry:
                self._left_registry = True
                await self.registry.stop(deregister=True)
        except Exception:  # noqa: BLE001 - the registry may be gone already (app being deleted)
            log.warning("could not deregister %s", self.replica_id)
        self.engine.drain()
        await self.server.drain()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.engine.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.server.stop(grace=1.0)
        await asyncio.to_thread(self.engine.shutdown)
        log.info("engine replica %s drained and stopped", self.replica_id)
