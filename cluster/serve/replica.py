"""The engine replica: a Serve deployment replica owning one expert-parallel group.

Its placement group (Serve's placement_group_bundles) holds bundle 0 for the replica itself and one
bundle per rank; the rank actors are created inside it. The replica (a ReplicaHost: cluster/engine/
replica_host.py) serves EngineService over gRPC on its own port and registers that address with its
app's ReplicaRegistry, where the router finds it. Scale-down drains: the replica leaves the
registry, refuses new requests (the router retries them elsewhere) and waits for its running
requests before its group goes.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from expertmesh.cluster.config import DeployConfig

from .autoscaling import KV_USAGE, RUNNING, WAITING

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0


def engine_config_from(cfg: DeployConfig):
    from expertmesh.cluster.engine.balancing import EplbConfig
    from expertmesh.cluster.engine.engine import EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    s, kv = cfg.scheduler, cfg.kv_cache
    sched = SchedulerConfig(kv_tokens_per_rank=kv.tokens_per_rank, page_size=kv.page_size, prefix_cache=kv.prefix_cache,
                            max_running_requests=s.max_running_requests, max_batch_tokens=s.max_batch_tokens,
                            chunked_prefill_tokens=s.chunked_prefill_tokens, max_waiting_requests=s.max_waiting_requests,
                            admission=s.admission, init_new_token_ratio=s.init_new_token_ratio,
                            min_new_token_ratio=s.min_new_token_ratio, ratio_decay_steps=s.ratio_decay_steps,
                            headroom_tokens=s.headroom_tokens)
    return EngineConfig(str(cfg.model.checkpoint), dtype=cfg.model.dtype, ep_size=cfg.parallel.ep_size, scheduler=sched,
                        device="cuda" if cfg.parallel.accelerator == "cuda" else "cpu",
                        sampling_overrides=cfg.model.sampling_defaults.model_dump(exclude_none=True),
                        default_max_tokens=s.default_max_tokens, rebuild_in_place=cfg.parallel.rebuild_in_place,
                        eplb=EplbConfig(**cfg.eplb.model_dump()), keep_fp8=cfg.model.keep_fp8,
                        int8_lm_head=cfg.model.int8_lm_head, greedy_head_screen=cfg.model.greedy_head_screen,
                        decode_graphs="auto" if cfg.model.decode_graphs else "off")


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


def replica_settings_from(cfg: DeployConfig, replica_id: str, host: str):
    from expertmesh.cluster.engine.replica_host import ReplicaSettings

    t = cfg.telemetry
    return ReplicaSettings(replica_id=replica_id, app=cfg.name, namespace=cfg.ray.namespace,
                           served_model_name=cfg.model.served_model_name, max_waiting=cfg.scheduler.max_waiting_requests,
                           host=host, telemetry_metrics=t.metrics, service_name=t.service_name,
                           otlp_endpoint=t.otlp_endpoint, trace_decode_every=t.trace_decode_every,
                           drain_timeout_s=DRAIN_TIMEOUT_S, exit_on_group_failure=True)


class EngineReplica:
    """Decorated into a Serve deployment by app.build_app (options come from the config): a thin
    shell over ReplicaHost that adds what only Serve asks for."""

    async def __init__(self, config: dict[str, Any]):
        import ray
        from ray import serve

        from expertmesh.cluster.engine.engine import Engine
        from expertmesh.cluster.engine.replica_host import ReplicaHost
        from expertmesh.cluster.ray_cluster import is_local_address

        self.cfg = DeployConfig.model_validate(config)
        replica_id = serve.get_replica_context().replica_id.unique_id
        pg = ray.util.get_current_placement_group()
        engine = await asyncio.to_thread(
            Engine, engine_config_from(self.cfg), None, None, placement_from(self.cfg, pg, 1),
            f"replica-{replica_id}", self.cfg.parallel.collective_timeout_s)
        node_ip = ray.util.get_node_ip_address()
        host = "127.0.0.1" if is_local_address(node_ip) else node_ip
        self.host = ReplicaHost(engine, replica_settings_from(self.cfg, replica_id, host))
        await self.host.start()

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.host.load()
        return {RUNNING: float(load.running), WAITING: float(load.waiting), KV_USAGE: float(load.kv_usage)}

    def check_health(self) -> None:
        """Serve restarts an unhealthy replica: a broken EP group fails the replica as a unit."""
        failed = self.host.failure()
        if failed:
            raise RuntimeError(f"expert-parallel group failed: {failed}")

    async def status(self) -> dict[str, Any]:
        return await self.host.status()

    async def __call__(self) -> dict[str, Any]:
        return await self.host.status()

    async def __del__(self) -> None:
        """Drain before the group goes (nothing to drain when __init__ never finished)."""
        host = getattr(self, "host", None)
        if host is not None:
            await host.drain_and_stop()
