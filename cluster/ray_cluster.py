"""Joining or starting Ray, with local clusters kept on 127.0.0.1.

Ray advertises the machine's own IP by default; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's own
single-machine mode) makes it resolve the node address to loopback, and GLOO_SOCKET_IFNAME=lo keeps
the ranks' gloo traffic there too. Both must be in the environment before Ray starts, so that the
raylet and every worker inherit them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def local_env() -> None:
    """Sets the loopback-only variables for a local cluster (idempotent; respects explicit values)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def token_auth_env() -> None:
    """Ray 2.60 turns token auth on by default; a driver joining a cluster sends the token only with
    RAY_AUTH_MODE=token. Set it when a token is at hand and the caller chose nothing else."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "expertmesh",
            include_dashboard: bool = False, **kwargs) -> None:
    """ray.init for expertmesh: join `address` if given, else start a local loopback-only cluster."""
    import ray

    if ray.is_initialized():
        return
    if address:
        token_auth_env()
        ray.init(address=address, namespace=namespace, **kwargs)
        log.info("joined Ray cluster at %s", address)
        return
    local_env()
    ray.init(num_cpus=num_cpus, namespace=namespace, include_dashboard=include_dashboard,
             dashboard_host="127.0.0.1", **kwargs)
    log.info("started a local Ray cluster on 127.0.0.1 (%s CPUs)", num_cpus)
