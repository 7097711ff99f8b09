"""The router as the Serve application's ingress deployment: it owns the public gRPC server (and
the OpenAI-compatible HTTP server) on the configured host and ports, and finds engine replicas
through its application's ReplicaRegistry. One router replica: it binds fixed ports."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from expertmesh.cluster.config import DeployConfig

log = logging.getLogger(__name__)


def router_config_from(cfg: DeployConfig):
    """The router's settings from the whole deployment config: its `router:` section, plus the app
    whose replicas it may route to and the checkpoint's tokenizer."""
    from expertmesh.cluster.router.config import RouterConfig

    return RouterConfig.from_deploy_section(cfg.router, tokenizer_path=str(cfg.model.checkpoint), startup_timeout_s=600.0,
                                            app=cfg.name, ray_namespace=cfg.ray.namespace)


class Router:
    async def __init__(self, config: dict[str, Any], replicas: Any = None):
        from expertmesh.cluster.router.server import RouterServer
        from expertmesh.cluster.telemetry.tracing import setup_tracing

        self.cfg = DeployConfig.model_validate(config)
        self.replicas = replicas  # the EngineReplica deployment's handle (for status)
        setup_tracing(self.cfg.telemetry.service_name + "-router", self.cfg.telemetry.otlp_endpoint)
        self.server = RouterServer(router_config_from(self.cfg))  # its app's own registry
        if self.cfg.telemetry.metrics:
            from expertmesh.cluster.telemetry.metrics import RouterMetrics

            self.server.dispatcher.on_recovery = RouterMetrics(self.cfg.name).on_recovery
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
            # this router's requests at each replica now (exact, not the last probe's report)
            "inflight": {r.replica_id: r.inflight for r in self.server.replicas.replicas.values()},
            "replica_failures": self.server.dispatcher.failures_total,
            "resumed_requests": self.server.dispatcher.resumed_total,
        }

    async def __call__(self) -> dict[str, Any]:
        return await self.status()

    async def __del__(self) -> None:
        await self.server.stop(grace=2.0)
