"""Joining or starting Ray, with local clusters kept on 127.0.0.1.

Ray advertises the machine's own IP by default; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's own
single-machine mode) makes it resolve the node address to loopback, and GLOO_SOCKET_IFNAME=lo keeps
the ranks' gloo traffic there too. Both must be in the environment before Ray starts, so that the
raylet and every worker inherit them.

A command that starts its own cluster uses `ray.init(address="local")`, so it never joins another
cluster by accident (a plain `ray.init()` follows RAY_ADDRESS or Ray's `ray_current_cluster` file,
which may name a cluster that is gone); a command that joins logs which cluster it joined.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


class RayTokenError(RuntimeError):
    """The cluster wants a token this process does not have."""


def is_local_address(address: str | None) -> bool:
    """An address on this machine's loopback (or none at all: a cluster started here)."""
    if not address:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def local_env() -> None:
    """Sets the loopback-only variables for a local cluster (idempotent; respects explicit values)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def has_token() -> bool:
    """A token where Ray looks for one: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def token_auth_env(token_path: str | Path | None = None) -> None:
    """Ray 2.60 turns token auth on by default; a driver joining a cluster sends the token only with
    RAY_AUTH_MODE=token. Points Ray at `token_path` when given (a cluster expertmesh started), and
    turns token mode on when a token is at hand and the caller chose nothing else."""
    if token_path and "RAY_AUTH_TOKEN" not in os.environ:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    if "RAY_AUTH_MODE" not in os.environ and has_token():
        os.environ["RAY_AUTH_MODE"] = "token"


def forget_address_file(address: str) -> None:
    """Removes Ray's `ray_current_cluster` file when it names `address` (a cluster being stopped)."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.read_text().strip() == address:
            path.unlink()
            log.info("removed %s (it named the stopped cluster %s)", path, address)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def join(address: str, namespace: str = "expertmesh", **kwargs):
    """ray.init(address=...) with one clear error when the cluster wants a token we lack; returns
    Ray's context (its dashboard_url)."""
    import ray
    from ray.exceptions import AuthenticationError

    if is_local_address(address):
        local_env()
    token_auth_env()
    had_token = has_token()
    try:
        ctx = ray.init(address=address, namespace=namespace, **kwargs)
    except Exception as exc:
        # Ray 2.60 refuses a driver without the cluster's token only after ~20 s of retries, as a
        # plain "Failed to connect": with no token at hand that is the likely cause, so say so.
        text = str(exc)
        if isinstance(exc, AuthenticationError) or "token" in text.lower() or (
                not had_token and "failed to connect" in text.lower()):
            raise RayTokenError(
                f"could not join the Ray cluster at {address}: it requires an authentication token and this process "
                f"has {'none' if not had_token else 'one it does not accept'}. Set RAY_AUTH_TOKEN_PATH to the cluster's "
                "token file (`expertmesh status` prints it for clusters that `expertmesh up` started) or RAY_AUTH_TOKEN "
                "to the token, with RAY_AUTH_MODE=token"
            ) from exc
        raise
    log.info("joined the Ray cluster at %s", address)
    return ctx


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "expertmesh",
            include_dashboard: bool = False, **kwargs) -> None:
    """ray.init for expertmesh: join `address` if given, else start a new local loopback-only cluster
    (never whatever RAY_ADDRESS or a leftover address file points at)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        join(address, namespace, **kwargs)
        return
    local_env()
    ray.init(address="local", num_cpus=num_cpus, namespace=namespace, include_dashboard=include_dashboard,
             dashboard_host="127.0.0.1", **kwargs)
    log.info("started a local Ray cluster on 127.0.0.1 (%s CPUs)", num_cpus)
