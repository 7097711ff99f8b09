"""The engine replica: a Serve deployment replica owning one expert-parallel group.

Its placement group (Serve's placement_group_bundles) holds bundle 0 for the replica itself and one
bundle per rank; the rank actors are created inside it. The replica serves EngineService over gRPC
on its own port and registers that address with the ReplicaRegistry, where the router finds it.
Scale-down drains: the replica leaves the registry, refuses new requests (the router retries them
elsewhere) and waits for its running requests before its group goes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from expertmesh.cluster.config import DeployConfig

from .autoscaling import KV_USAGE, RUNNING, WAITING

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0


def engine_config_from(cfg: DeployConfig):
    from expertmesh.cluster.engine.engine import EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    s, kv = cfg.scheduler, cfg.kv_cache
    sched = SchedulerConfig(kv_tokens_per_rank=kv.tokens_per_rank, page_size=kv.page_size, prefix_cache=kv.prefix_cache,
                            max_running_requests=s.max_running_requests, max_batch_tokens=s.max_batch_tokens,
                            chunked_prefill_tokens=s.chunked_prefill_tokens, max_waiting_requests=s.max_waiting_requests)
    return EngineConfig(str(cfg.model.checkpoint), dtype=cfg.model.dtype, ep_size=cfg.parallel.ep_size, scheduler=sched,
                        device="cuda" if cfg.parallel.accelerator == "cuda" else "cpu")


def placement_from(cfg: DeployConfig, placement_group=None, first_bundle: int = 1):
    from expertmesh.cluster.engine.executor import PlacementSpec

    p = cfg.parallel
    custom = {f"accelerator_type:{p.accelerator_type}": 0.001} if p.accelerator_type and p.gpus_per_rank else {}
    return PlacementSpec(strategy=p.placement_strategy, cpus_per_rank=p.cpus_per_rank, gpus_per_rank=p.gpus_per_rank,
                         custom_resources=custom, placement_group=placement_group, first_bundle=first_bundle)


def rank_bundles(cfg: DeployConfig) -> list[dict[str, float]]:
    """Bundle 0: the replica; then one bundle per rank."""
    p = cfg.parallel
    spec = placement_from(cfg)
    return [{"CPU": p.engine_cpus}] + [spec.bundle() for _ in range(p.ep_size)]


class EngineReplica:
    """Decorated into a Serve deployment by app.build_app (options come from the config)."""

    async def __init__(self, config: dict[str, Any]):
        import ray
        from ray import serve

        from expertmesh.cluster.engine.async_engine import AsyncEngine
        from expertmesh.cluster.engine.engine import Engine
        from expertmesh.cluster.engine.grpc_service import EngineServer
        from expertmesh.cluster.router.registry import RegistryClient, RegistryRef
        from expertmesh.cluster.telemetry.metrics import EngineMetrics
        from expertmesh.cluster.telemetry.tracing import setup_tracing

        self.cfg = DeployConfig.model_validate(config)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        t0 = time.monotonic()
        pg = ray.util.get_current_placement_group()
        engine = await asyncio.to_thread(
            Engine, engine_config_from(self.cfg), None, None, placement_from(self.cfg, pg, 1),
            f"replica-{self.replica_id}", self.cfg.parallel.collective_timeout_s)
        name = self.cfg.model.served_model_name or engine.model_name
        engine.model_name = name
        self.metrics = EngineMetrics(self.replica_id, name) if self.cfg.telemetry.metrics else None
        tracer = setup_tracing(self.cfg.telemetry.service_name, self.cfg.telemetry.otlp_endpoint)
        self.engine = AsyncEngine(engine, on_step=self._on_step, tracer=tracer,
                                  trace_decode_every=self.cfg.telemetry.trace_decode_every)
        host = "127.0.0.1" if ray.util.get_node_ip_address() in ("127.0.0.1", "localhost") else \
            ray.util.get_node_ip_address()
        self.server = EngineServer(self.engine, host=host, port=0, replica_id=self.replica_id,
                                   max_waiting=self.cfg.scheduler.max_waiting_requests,
                                   tokenizer_path=str(self.cfg.model.checkpoint))
        address = await self.server.start()
        ranks = [{k: v for k, v in r.items() if k != "read_tensor_names"} for r in engine.executor.describe()]
        meta = {"model": name, "pid": str(os.getpid()), "ranks": json.dumps(ranks),
                "started_s": f"{time.monotonic() - t0:.1f}"}
        # this app's registry only; the heartbeat carries the metadata and keeps the entry alive
        self.registry = RegistryClient(self.replica_id, address, meta, ref=RegistryRef(self.cfg.name, self.cfg.ray.namespace))
        await self.registry.start()
        self._last_expert_sample = 0.0
        log.info("engine replica %s serving on %s in %.1fs", self.replica_id, address, time.monotonic() - t0)

    def _on_step(self, engine, outputs) -> None:
        if self.metrics is not None:
            self.metrics.on_step(engine, outputs)
        now = time.monotonic()
        if now - self._last_expert_sample > 2.0:  # expert load: a Ray call per rank, so not every step
            self._last_expert_sample = now
            load = engine.executor.expert_load()
            if self.metrics is not None:
                self.metrics.record_expert_load(load)
            self.registry.metadata["expert_load"] = json.dumps(load)  # for `expertmesh status`, next heartbeat

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.engine.load()
        if self.metrics is not None:
            self.metrics.set_gauges(load)
        return {RUNNING: float(load.running), WAITING: float(load.waiting), KV_USAGE: float(load.kv_usage)}

    def check_health(self) -> None:
        """Serve restarts an unhealthy replica: a broken EP group fails the replica as a unit."""
        failed = getattr(self.engine.engine.executor, "failed", None)
        if failed:
            raise RuntimeError(f"expert-parallel group failed: {failed}")

    async def status(self) -> dict[str, Any]:
        load = self.engine.load()
        expert_load = await asyncio.to_thread(self.engine.engine.executor.expert_load)
        return {
            "replica_id": self.replica_id, "address": self.server.address, "model": self.engine.model_name,
            "ranks": [{k: v for k, v in r.items() if k != "read_tensor_names"} for r in self.engine.engine.executor.describe()],
            "running": load.running, "waiting": load.waiting, "kv_used_tokens": load.kv_used_tokens,
            "kv_total_tokens": load.kv_total_tokens, "kv_usage": load.kv_usage, "cache_hit_rate": load.cache_hit_rate,
            "expert_load": expert_load,
        }

    async def __call__(self) -> dict[str, Any]:
        return await self.status()

    async def __del__(self) -> None:
        """Drain before the group goes: leave the registry, refuse new work, finish running requests."""
        try:
            await self.registry.stop(deregister=True)
        except Exception:
            log.warning("could not deregister %s", self.replica_id)
        self.engine.drain()
        await self.server.drain()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.engine.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.server.stop(grace=1.0)
        await asyncio.to_thread(self.engine.shutdown)
        log.info("engine replica %s drained and stopped", self.replica_id)
