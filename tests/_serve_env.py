"""Helpers for tests that deploy the real Serve application on the session's Ray cluster."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from expertmesh.cluster.config import DeployConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_app_config(name: str, checkpoint: Path, **sections: dict[str, Any]) -> DeployConfig:
    """The tiny checkpoint at EP2 with fractional CPUs and a router on a free loopback port;
    `sections` update the config's sections (router, autoscaling, telemetry, ...)."""
    base: dict[str, dict[str, Any]] = {
        "model": {"checkpoint": str(checkpoint), "dtype": "float32", "served_model_name": "tiny"},
        "parallel": {"ep_size": 2, "cpus_per_rank": 0.1, "engine_cpus": 0.1, "collective_timeout_s": 30},
        "kv_cache": {"tokens_per_rank": 2048, "page_size": 16},
        "scheduler": {"max_running_requests": 4, "max_batch_tokens": 512, "chunked_prefill_tokens": 256,
                      "max_waiting_requests": 64},
        "router": {"host": "127.0.0.1", "grpc_port": free_port(), "http_port": 0, "policy": "least_load"},
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return DeployConfig.model_validate({"name": name, **base})


def deploy(cfg: DeployConfig) -> str:
    """serve.run of the application (not blocking); returns the router's gRPC address."""
    from ray import serve
    from ray.serve.config import ProxyLocation

    from expertmesh.cluster.serve.app import build_app

    serve.start(proxy_location=ProxyLocation.Disabled, http_options={"host": "127.0.0.1"})
    serve.run(build_app({"config": cfg.to_dict()}), name=cfg.name, route_prefix=None, blocking=False)
    return f"127.0.0.1:{cfg.router.grpc_port}"
