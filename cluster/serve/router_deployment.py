"""The router as the Serve application's ingress deployment: it owns the public gRPC server (and
the OpenAI-compatible HTTP server) on the configured host and ports, and finds engine replicas
through the ReplicaRegistry. One router replica: it binds fixed ports."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from expertmesh.cluster.config import DeployConfig

log = logging.getLogger(__name__)


def router_config_from(cfg: DeployConfig):
    from expertmesh.cluster.router.config import CacheAwareSettings, RouterConfig

    r = cfg.router
    token = os.environ.get(r.auth.token_env) if r.auth else None
    if r.auth and not token:
        raise RuntimeError(f"router.auth.token_env names {r.auth.token_env}, which is not set in the router's environment")
    return RouterConfig(
        host=r.host, grpc_port=r.grpc_port, http_port=r.http_port or None, policy=r.policy,
        cache_aware=CacheAwareSettings(cache_threshold=r.cache_threshold, balance_abs_threshold=r.balance_abs_threshold,
                                       balance_rel_threshold=r.balance_rel_threshold),
        auth_token=token,
        tls_cert_file=str(r.tls.cert_file) if r.tls else None, tls_key_file=str(r.tls.key_file) if r.tls else None,
        tokenizer_path=str(cfg.model.checkpoint), startup_timeout_s=600.0,
    )


class Router:
    async def __init__(self, config: dict[str, Any], replicas: Any = None):
        from expertmesh.cluster.router.registry import RayRegistrySource, get_or_create_registry
        from expertmesh.cluster.router.server import RouterServer
        from expertmesh.cluster.telemetry.tracing import setup_tracing

        self.cfg = DeployConfig.model_validate(config)
        self.replicas = replicas  # the EngineReplica deployment's handle (for status)
        setup_tracing(self.cfg.telemetry.service_name + "-router", self.cfg.telemetry.otlp_endpoint)
        registry = get_or_create_registry(detached=True)
        self.server = RouterServer(router_config_from(self.cfg), RayRegistrySource(registry))
        self._start = asyncio.get_running_loop().create_task(self.server.start())

    async def check_health(self) -> None:
        if self._start.done() and self._start.exception() is not None:
            raise RuntimeError(f"router failed to start: {self._start.exception()}")

    async def status(self) -> dict[str, Any]:
        return {
            "grpc": self.server.grpc_address if self.server.grpc_port else None,
            "http": self.server.http_address if self.server.http_port else None,
            "started": self._start.done() and self._start.exception() is None,
            "replicas": [r.replica_id for r in self.server.replicas.available()],
        }

    async def __call__(self) -> dict[str, Any]:
        return await self.status()

    async def __del__(self) -> None:
        await self.server.stop(grace=2.0)
