"""`expertmesh router`: run the router on its own (a process or container of its own), in front of
replicas given as addresses or found through the Ray ReplicaRegistry. Stops cleanly on SIGINT or
SIGTERM (health turns NOT_SERVING, in-flight streams get a grace period)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Sequence

from expertmesh.cluster.router.config import RouterConfig
from expertmesh.cluster.router.server import RouterServer

log = logging.getLogger(__name__)


def build_config(argv: Sequence[str] | None) -> tuple[RouterConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="expertmesh router", description=__doc__)
    p.add_argument("--config", default=None, help="deployment YAML; its router: section is the base")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None, help="gRPC port (0: ephemeral)")
    p.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP port (0: ephemeral)")
    p.add_argument("--policy", choices=["cache_aware", "least_load", "round_robin"], default=None)
    p.add_argument("--replica", action="append", default=[], help="ID=HOST:PORT or HOST:PORT (repeatable); "
                   "none: discover replicas through the Ray ReplicaRegistry")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join for the registry (default: a new local one)")
    p.add_argument("--app", default=None, help="route only to the replicas of this application (default: the "
                   "config's name, else expertmesh)")
    p.add_argument("--namespace", default=None, help="the application's Ray namespace (default: the config's, "
                   "else expertmesh)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: what the first replica reports)")
    p.add_argument("--auth-token-env", default=None, help="environment variable holding the bearer token")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in dict(host=args.host, grpc_port=args.port, http_port=args.http_port,
                                       policy=args.policy, tokenizer_path=args.tokenizer, app=args.app,
                                       ray_namespace=args.namespace).items() if v is not None}
    if args.replica:
        overrides["replicas"] = args.replica
    if args.auth_token_env:
        import os

        token = os.environ.get(args.auth_token_env)
        if not token:
            p.error(f"--auth-token-env: {args.auth_token_env} is unset or empty")
        overrides["auth_token"] = token
    if args.config:
        from expertmesh.cluster.config import load_config

        deploy = load_config(args.config)
        overrides = {"app": deploy.name, "ray_namespace": deploy.ray.namespace, **overrides}
        config = RouterConfig.from_deploy_section(deploy.router, **overrides)
    else:
        config = RouterConfig(**overrides)
    return config, args


async def serve(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    router = RouterServer(config)
    await router.start()
    print(f"expertmesh router: gRPC on {router.grpc_address}"
          + (f", HTTP on {router.http_address}" if router.http_port else ""), flush=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping the router")
    await router.stop(grace=5.0)


def router_main(argv: Sequence[str] | None = None) -> int:
    config, args = build_config(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.replicas:
        from expertmesh.cluster.ray_cluster import connect

        connect(args.ray_address)
    asyncio.run(serve(config))
    return 0
