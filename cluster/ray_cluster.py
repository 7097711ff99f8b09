"""Joining or starting Ray, with local clusters kept on 127.0.0.1.

Ray advertises the machine's own IP by default; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's own
single-machine mode) makes it resolve the node address to loopback, and GLOO_SOCKET_IFNAME=lo keeps
the ranks' gloo traffic there too. Both must be in the environment before Ray starts, so that the
raylet and every worker inherit them.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def local_env() -> None:
    """Sets the loopback-only variables for a local cluster (idempotent; respects explicit values)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "expertmesh",
            include_dashboard: bool = False, **kwargs) -> None:
    """ray.init for expertmesh: join `address` if given, else start a local loopback-only cluster."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=namespace, **kwargs)
        log.info("joined Ray cluster at %s", address)
        return
    local_env()
    ray.init(num_cpus=num_cpus, namespace=namespace, include_dashboard=include_dashboard,
             dashboard_host="127.0.0.1", **kwargs)
    log.info("started a local Ray cluster on 127.0.0.1 (%s CPUs)", num_cpus)
