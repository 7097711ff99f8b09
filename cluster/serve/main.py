"""`expertmesh up | status | down`: the Serve application's lifecycle from the command line.

`up` deploys onto a running cluster (`--address` or the config's ray.address) or starts an
embedded local one with `ray start --head` bound to 127.0.0.1, so the application outlives the
command; a small state file remembers where it went, so `status` and `down` need no flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def state_dir() -> Path:
    return Path(os.environ.get("EXPERTMESH_STATE_DIR", Path.home() / ".expertmesh"))


def _state_file(name: str) -> Path:
    return state_dir() / f"{name}.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_local_cluster(num_cpus: int | None) -> tuple[str, int]:
    """A single-node Ray on 127.0.0.1 that outlives this command: `ray start --head --block` in a
    session of its own, so `down` can stop exactly this cluster (by process group) and nothing else
    on the machine. Returns (address, pid)."""
    from expertmesh.cluster.ray_cluster import LOCAL_ENV

    env = {**os.environ, **LOCAL_ENV, "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    cmd = [_ray_bin(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={_free_port()}",
           f"--num-cpus={num_cpus or os.cpu_count() or 2}"]
    state_dir().mkdir(parents=True, exist_ok=True)
    logf = open(state_dir() / f"ray-{port}.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {proc.returncode}; see {logf.name}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        raise TimeoutError("the local Ray head did not come up in 120 s")
    log.info("started a local Ray head on 127.0.0.1:%d in %.1fs (pid %d)", port, time.monotonic() - t0, proc.pid)
    return f"127.0.0.1:{port}", proc.pid


def stop_local_cluster(pid: int, timeout_s: float = 60.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    os.killpg(pid, signal.SIGKILL)


def _connect(address: str, namespace: str) -> None:
    import ray

    from expertmesh.cluster.ray_cluster import local_env, token_auth_env

    if address.startswith("127.0.0.1") or address.startswith("localhost"):
        local_env()
    token_auth_env()
    ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)


def _wait_router(host: str, port: int, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last = "not reachable"
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"{host}:{port}") as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as exc:
            last = exc.code().name
        time.sleep(0.5)
    raise TimeoutError(f"router at {host}:{port} not serving after {timeout_s:.0f}s (last: {last})")


def _prepare_env(address: str | None) -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is first imported: set the loopback
    variables before any `import ray` for local clusters."""
    from expertmesh.cluster.ray_cluster import local_env

    if address is None or address.startswith(("127.0.0.1", "localhost")):
        local_env()
        # `ray start` turns token auth on (Ray 2.60's default); the driver must ask for it too
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    else:
        from expertmesh.cluster.ray_cluster import token_auth_env

        token_auth_env()


def up(config_path: str, address: str | None = None, timeout_s: float = 600.0, num_cpus: int | None = None) -> dict:
    from expertmesh.cluster.config import load_config

    cfg = load_config(config_path)
    _prepare_env(address or cfg.ray.address)
    from ray import serve
    from ray.serve.config import ProxyLocation

    ckpt = Path(cfg.model.checkpoint)
    if not (ckpt / "config.json").exists():
        spec = cfg.model.generate_if_missing
        if spec is None:
            raise FileNotFoundError(f"model.checkpoint {ckpt} does not exist and model.generate_if_missing is not set")
        from expertmesh.cluster.checkpoints import make_checkpoint

        print(f"generating the {spec.preset} checkpoint at {ckpt}", file=sys.stderr)
        make_checkpoint(ckpt, preset=spec.preset, seed=spec.seed, fp8=spec.fp8)
    address = address or cfg.ray.address
    started_local = address is None
    pid = None
    if started_local:
        address, pid = start_local_cluster(num_cpus)
    state = {"name": cfg.name, "address": address, "started_local": started_local, "ray_pid": pid, "config": str(Path(config_path).resolve()),
             "namespace": cfg.ray.namespace, "grpc": f"{cfg.router.host}:{cfg.router.grpc_port}",
             "http": f"http://{cfg.router.host}:{cfg.router.http_port}" if cfg.router.http_port else None}
    state_dir().mkdir(parents=True, exist_ok=True)
    _state_file(cfg.name).write_text(json.dumps(state, indent=2))
    try:
        _connect(address, cfg.ray.namespace)
        from .app import build_app

        serve.start(proxy_location=ProxyLocation.Disabled, http_options={"host": "127.0.0.1"})
        t0 = time.monotonic()
        serve.run(build_app({"config": cfg.to_dict()}), name=cfg.name, route_prefix=None, blocking=False)
        _wait_router(cfg.router.host, cfg.router.grpc_port, timeout_s)
    except BaseException:
        if pid is not None:  # leave nothing behind that the user did not ask for
            stop_local_cluster(pid)
            _state_file(cfg.name).unlink(missing_ok=True)
        raise
    state["ready_s"] = round(time.monotonic() - t0, 1)
    _state_file(cfg.name).write_text(json.dumps(state, indent=2))
    return state


def status(name: str = "expertmesh", address: str | None = None) -> dict[str, Any]:
    st = json.loads(_state_file(name).read_text()) if _state_file(name).exists() else {"name": name}
    address = address or st.get("address")
    if not address:
        raise RuntimeError(f"no running application '{name}' recorded in {state_dir()}; pass --address")
    _prepare_env(address)
    import grpc
    from ray import serve

    from expertmesh.cluster.router.registry import get_registry
    from expertmesh.v1 import engine_pb2, engine_pb2_grpc

    _connect(address, st.get("namespace", "expertmesh"))
    import ray

    app = serve.status().applications.get(name)
    out: dict[str, Any] = {"name": name, "address": address, "grpc": st.get("grpc"), "http": st.get("http"),
                           "app_status": app.status.value if app else "NOT_DEPLOYED", "deployments": {}, "replicas": []}
    if app:
        for dname, d in app.deployments.items():
            out["deployments"][dname] = {"status": d.status.value,
                                         "replicas": {getattr(k, "value", k): v for k, v in d.replica_states.items()}}
    try:
        _, entries = ray.get(get_registry().snapshot.remote())
    except ValueError:
        entries = []
    for e in entries:
        rec: dict[str, Any] = {"replica_id": e["replica_id"], "address": e["address"]}
        meta = e.get("metadata") or {}
        for key in ("ranks", "expert_load"):
            if key in meta:
                rec[key] = json.loads(meta[key])
        try:
            with grpc.insecure_channel(e["address"]) as ch:
                load = engine_pb2_grpc.EngineServiceStub(ch).GetLoad(engine_pb2.EngineLoadRequest(), timeout=5)
            rec.update(running=load.running, waiting=load.waiting, kv_usage=round(load.kv_usage, 4),
                       cache_hit_rate=round(load.cache_hit_rate, 4))
        except grpc.RpcError as exc:
            rec["error"] = exc.code().name
        out["replicas"].append(rec)
    return out


def down(name: str = "expertmesh", address: str | None = None) -> dict[str, Any]:
    st = json.loads(_state_file(name).read_text()) if _state_file(name).exists() else {"name": name}
    address = address or st.get("address")
    if not address:
        raise RuntimeError(f"no running application '{name}' recorded in {state_dir()}; pass --address")
    _prepare_env(address)
    from ray import serve

    result = {"name": name, "deleted": False, "stopped_local_cluster": False}
    try:
        _connect(address, st.get("namespace", "expertmesh"))
        serve.delete(name)
        result["deleted"] = True
        try:
            import ray

            from expertmesh.cluster.router.registry import get_registry

            ray.kill(get_registry())
        except ValueError:
            pass
        if st.get("started_local"):
            serve.shutdown()
    finally:
        if st.get("started_local") and st.get("ray_pid"):
            import ray

            ray.shutdown()
            stop_local_cluster(int(st["ray_pid"]))
            result["stopped_local_cluster"] = True
        _state_file(name).unlink(missing_ok=True)
    return result


# -- argv entry points (wired in cluster/cli.py) --------------------------------------------------
def up_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="expertmesh up", description="start the Serve application from a config")
    p.add_argument("config")
    p.add_argument("--address", help="a running Ray cluster (default: the config's ray.address, else a local one)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the router to serve")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local cluster")
    args = p.parse_args(argv)
    from expertmesh.cluster.config import ConfigError

    try:
        state = up(args.config, args.address, args.timeout, args.num_cpus)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(state))
    return 0


def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="expertmesh status")
    p.add_argument("--name", default="expertmesh")
    p.add_argument("--address")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    st = status(args.name, args.address)
    if args.json:
        print(json.dumps(st))
        return 0
    print(f"{st['name']}: {st['app_status']}  ray={st['address']}  grpc={st['grpc']}  http={st['http']}")
    for dname, d in st["deployments"].items():
        print(f"  deployment {dname}: {d['status']} {d['replicas']}")
    for r in st["replicas"]:
        print(f"  replica {r['replica_id']} @ {r['address']}: running={r.get('running')} waiting={r.get('waiting')} "
              f"kv={r.get('kv_usage')} hit_rate={r.get('cache_hit_rate')}")
        for rank in r.get("ranks", []):
            print(f"    rank {rank['rank']} experts {rank['expert_range']} node {rank.get('node')} actor {rank.get('actor_name')}")
        if r.get("expert_load"):
            per_expert = [sum(col) for col in zip(*[row for rank in r["expert_load"] for row in rank])]
            print(f"    tokens per expert (all MoE layers): {per_expert}")
    return 0


def down_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="expertmesh down")
    p.add_argument("--name", default="expertmesh")
    p.add_argument("--address")
    args = p.parse_args(argv)
    print(json.dumps(down(args.name, args.address)))
    return 0
