"""`expertmesh up | status | down`: the Serve application's lifecycle from the command line.

`up` deploys onto a running cluster (`--address` or the config's ray.address) or starts an
embedded local one (cluster/local_head.py: 127.0.0.1, its own token, the dashboard), so the
application outlives the command; a small state file per app remembers where it went, so
`status` and `down` need no flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def state_dir() -> Path:
    return Path(os.environ.get("EXPERTMESH_STATE_DIR", Path.home() / ".expertmesh"))


def _state_file(name: str) -> Path:
    return state_dir() / f"{name}.json"


def _read_state(name: str) -> dict[str, Any]:
    path = _state_file(name)
    return json.loads(path.read_text()) if path.exists() else {"name": name}


def _known_token(address: str) -> str | None:
    """The token file of a cluster that `up` started here (any app's state naming `address`)."""
    if not state_dir().is_dir():
        return None
    for path in sorted(state_dir().glob("*.json")):
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        token = st.get("ray_token_path")
        if st.get("address") == address and token and Path(token).is_file():
            return token
    return None


def _prepare_env(address: str | None) -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is first imported: set the loopback
    variables before any `import ray` for local clusters, and point Ray at the token of a cluster
    that `up` started here."""
    from expertmesh.cluster.ray_cluster import is_local_address, local_env, token_auth_env

    if is_local_address(address):
        local_env()
    token_auth_env(_known_token(address) if address else None)


def _connect(address: str, namespace: str) -> Any:
    from expertmesh.cluster.ray_cluster import join

    return join(address, namespace, logging_level=logging.WARNING, log_to_driver=False)


def _router_credentials(cfg: Any) -> Any:
    """Plaintext, or TLS trusting the router's own certificate (self-signed or a chain with its CA)."""
    import grpc

    tls = cfg.router.tls
    return None if tls is None else grpc.ssl_channel_credentials(root_certificates=Path(tls.cert_file).read_bytes())


def _wait_router(cfg: Any, timeout_s: float) -> None:
    """Until the router's health says SERVING, over TLS when the router serves TLS; the timeout names
    the last thing seen and what Serve says about the application's deployments."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{cfg.router.host}:{cfg.router.grpc_port}"
    creds = _router_credentials(cfg)
    deadline = time.monotonic() + timeout_s
    last = "not reachable"
    while time.monotonic() < deadline:
        try:
            with (grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        failed = _app_failure(cfg.name)
        if failed:
            raise RuntimeError(f"the application '{cfg.name}' failed to deploy: {failed}")
        time.sleep(0.5)
    raise TimeoutError(f"router at {target}{' (TLS)' if creds else ''} not serving after {timeout_s:.0f}s "
                       f"(last: {last}); Serve says: {_app_failure(cfg.name, any_state=True) or 'nothing'}")


def _app_failure(name: str, any_state: bool = False) -> str | None:
    """Serve's own words about an application that failed (or, with any_state, whatever it says)."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception as exc:  # noqa: BLE001 - status is a diagnosis, never the failure itself
        return f"(serve.status failed: {exc})" if any_state else None
    if app is None:
        return None
    if app.status.value not in ("DEPLOY_FAILED", "UNHEALTHY") and not any_state:
        return None
    parts = [f"{app.status.value}{': ' + app.message if app.message else ''}"]
    parts += [f"{d}: {st.status.value} {st.message}".strip() for d, st in app.deployments.items() if st.message]
    return "; ".join(parts)


def up(config_path: str, address: str | None = None, timeout_s: float = 600.0, num_cpus: int | None = None) -> dict:
    from expertmesh.cluster.config import load_config
    from expertmesh.cluster.local_head import start_local_head, stop_local_head

    cfg = load_config(config_path)
    address = address or cfg.ray.address
    _prepare_env(address)
    ckpt = Path(cfg.model.checkpoint)
    if not (ckpt / "config.json").exists():
        spec = cfg.model.generate_if_missing
        if spec is None:
            raise FileNotFoundError(f"model.checkpoint {ckpt} does not exist and model.generate_if_missing is not set")
        from expertmesh.cluster.devtools.checkpoints import make_checkpoint

        log.info("generating the %s checkpoint at %s", spec.preset, ckpt)
        make_checkpoint(ckpt, preset=spec.preset, seed=spec.seed, fp8=spec.fp8)
    head = None
    if address is None:
        head = start_local_head(state_dir(), cfg.name, num_cpus, cfg.ray.dashboard_port)
        os.environ.update(head.env())
        address = head.address
    state = {"name": cfg.name, "address": address, "started_local": head is not None,
             "ray_pid": head.pid if head else None, "ray_token_path": str(head.token_path) if head else _known_token(address),
             "dashboard": head.dashboard_url if head else None, "config": str(Path(config_path).resolve()),
             "namespace": cfg.ray.namespace, "grpc": f"{cfg.router.host}:{cfg.router.grpc_port}",
             "tls": cfg.router.tls is not None,
             "http": f"http://{cfg.router.host}:{cfg.router.http_port}" if cfg.router.http_port else None}
    state_dir().mkdir(parents=True, exist_ok=True)
    _state_file(cfg.name).write_text(json.dumps(state, indent=2))
    t0 = time.monotonic()
    try:
        from ray import serve
        from ray.serve.config import ProxyLocation

        _connect(address, cfg.ray.namespace)
        from .app import build_app

        serve.start(proxy_location=ProxyLocation.Disabled, http_options={"host": "127.0.0.1"})
        serve.run(build_app({"config": cfg.to_dict()}), name=cfg.name, route_prefix=None, blocking=False)
        _wait_router(cfg, timeout_s)
    except BaseException:
        _state_file(cfg.name).unlink(missing_ok=True)
        if head is not None:  # leave nothing behind that the user did not ask for
            import ray

            ray.shutdown()
            stop_local_head(head)
        raise
    state["ready_s"] = round(time.monotonic() - t0, 1)
    _state_file(cfg.name).write_text(json.dumps(state, indent=2))
    return state


def _operator_view(st: dict[str, Any], address: str, dashboard_url: str | None) -> dict[str, Any]:
    """Where an operator looks: the dashboard, Prometheus endpoints, and the environment that makes
    `ray list actors` / `ray summary actors` talk to this cluster."""
    import ray

    dashboard = st.get("dashboard") or (dashboard_url if not dashboard_url or "://" in dashboard_url
                                        else f"http://{dashboard_url}")
    metrics = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
               for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    env = {"RAY_ADDRESS": address}
    if dashboard:
        env["RAY_API_SERVER_ADDRESS"] = dashboard
    if os.environ.get("RAY_AUTH_MODE") == "token":
        env["RAY_AUTH_MODE"] = "token"
    token = st.get("ray_token_path") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token:
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    return {"dashboard": dashboard, "metrics": metrics, "ray_env": env,
            "grafana": "import docs/grafana-dashboard.json into Grafana, with a Prometheus data source that "
                       "scrapes the metrics endpoints (series ray_expertmesh_*)"}


def status(name: str = "expertmesh", address: str | None = None) -> dict[str, Any]:
    st = _read_state(name)
    address = address or st.get("address")
    if not address:
        raise RuntimeError(f"no running application '{name}' recorded in {state_dir()}; pass --address")
    _prepare_env(address)
    import grpc
    from ray import serve

    from expertmesh.cluster.router.registry import RegistryRef, get_registry
    from expertmesh.v1 import engine_pb2, engine_pb2_grpc

    ctx = _connect(address, st.get("namespace", "expertmesh"))
    import ray

    app = serve.status().applications.get(name)
    out: dict[str, Any] = {"name": name, "address": address, "grpc": st.get("grpc"), "http": st.get("http"),
                           "app_status": app.status.value if app else "NOT_DEPLOYED", "deployments": {}, "replicas": []}
    out.update(_operator_view(st, address, getattr(ctx, "dashboard_url", None)))
    if app:
        for dname, d in app.deployments.items():
            out["deployments"][dname] = {"status": d.status.value,
                                         "replicas": {getattr(k, "value", k): v for k, v in d.replica_states.items()}}
    try:
        registry = get_registry(RegistryRef(name, st.get("namespace", "expertmesh")))
        _, entries = ray.get(registry.snapshot.remote())
        credential = (("authorization", f"Bearer {ray.get(registry.internal_token.remote())}"),)
    except ValueError:
        entries, credential = [], ()
    for e in entries:
        rec: dict[str, Any] = {"replica_id": e["replica_id"], "address": e["address"]}
        meta = e.get("metadata") or {}
        for key in ("ranks", "expert_load", "rebuilds", "eplb"):
            if key in meta:
                rec[key] = json.loads(meta[key])
        try:
            with grpc.insecure_channel(e["address"]) as ch:
                load = engine_pb2_grpc.EngineServiceStub(ch).GetLoad(engine_pb2.EngineLoadRequest(), timeout=5,
                                                                     metadata=credential)
            rec.update(running=load.running, waiting=load.waiting, kv_usage=round(load.kv_usage, 4),
                       cache_hit_rate=round(load.cache_hit_rate, 4), admission=load.admission,
                       kv_reserved=round(load.kv_reserved_tokens / (load.kv_total_tokens or 1), 4),
                       retractions=load.retractions_total, recomputed_tokens=load.recomputed_tokens_total,
                       group=load.group_state or "ok", group_rebuilds=load.group_rebuilds_total)
        except grpc.RpcError as exc:
            rec["error"] = exc.code().name
        out["replicas"].append(rec)
    return out


def down(name: str = "expertmesh", address: str | None = None) -> dict[str, Any]:
    """Deletes this application and its registry, nothing of another app's; stops the local cluster
    when `up` started one (and removes its token and Ray's address file)."""
    from expertmesh.cluster.local_head import stop_local_head

    st = _read_state(name)
    address = address or st.get("address")
    if not address:
        raise RuntimeError(f"no running application '{name}' recorded in {state_dir()}; pass --address")
    _prepare_env(address)
    result = {"name": name, "deleted": False, "stopped_local_cluster": False}
    try:
        from ray import serve

        _connect(address, st.get("namespace", "expertmesh"))
        serve.delete(name)
        result["deleted"] = True
        import ray

        from expertmesh.cluster.router.registry import RegistryRef, get_registry

        try:
            ray.kill(get_registry(RegistryRef(name, st.get("namespace", "expertmesh"))))
        except ValueError:
            pass
        if st.get("started_local"):
            serve.shutdown()
    finally:
        if st.get("started_local") and st.get("ray_pid"):
            import ray

            ray.shutdown()
            stop_local_head(pid=int(st["ray_pid"]), address=address, token_path=st.get("ray_token_path"))
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
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(state))
    return 0


def eplb_line(e: dict[str, Any]) -> str:
    """One line of expert load balancing for `status`: slots, rebalances, balancedness per layer."""
    fmt = lambda xs: "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"  # noqa: E731
    return (f"eplb: {e['redundant_slots']} redundant slots, {e['rebalances']} rebalance(s), last "
            f"{e['last_duration_s'] * 1e3:.0f} ms ({e['last_move_s'] * 1e3:.1f} ms moving, {e['moved_experts']} "
            f"copies); balancedness per layer {fmt(e['balancedness'])} (last rebalance "
            f"{fmt(e['balancedness_before'])} -> {fmt(e['balancedness_after'])})")


def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="expertmesh status")
    p.add_argument("--name", default="expertmesh")
    p.add_argument("--address")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        st = status(args.name, args.address)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st))
        return 0
    print(f"{st['name']}: {st['app_status']}  ray={st['address']}  grpc={st['grpc']}  http={st['http']}")
    for dname, d in st["deployments"].items():
        print(f"  deployment {dname}: {d['status']} {d['replicas']}")
    for r in st["replicas"]:
        print(f"  replica {r['replica_id']} @ {r['address']}: running={r.get('running')} waiting={r.get('waiting')} "
              f"kv={r.get('kv_usage')} hit_rate={r.get('cache_hit_rate')}")
        if "group" in r:
            last = (r.get("rebuilds") or [{}])[-1]
            print(f"    group {r['group']}: {r['group_rebuilds']} in-place rebuild(s)"
                  + (f", last replaced rank(s) {last.get('ranks')} in {last.get('seconds')}s" if last else ""))
        if "admission" in r:
            print(f"    admission by {r['admission']}: kv reserved beyond held={r['kv_reserved']} "
                  f"retractions={r['retractions']} recomputed tokens={r['recomputed_tokens']}")
        for rank in r.get("ranks", []):
            held = (f"slots (layer 0) {rank['slot_experts'][0]}" if rank.get("slot_experts")
                    else f"experts {rank['expert_range']}")
            wb = rank.get("weight_bytes") or {}
            weights = (f" weights {sum(wb.values()) / 2**20:.1f} MiB"
                       + (f" ({wb['fp8'] / 2**20:.1f} MiB fp8)" if wb.get("fp8") else "")) if wb else ""
            graphs = f" decode graphs {rank['decode_graphs']}" if rank.get("decode_graphs") else ""
            print(f"    rank {rank['rank']} {held}{weights} node {rank.get('node')} actor {rank.get('actor_name')}{graphs}")
        if r.get("eplb"):
            print("    " + eplb_line(r["eplb"]))
        if r.get("expert_load"):
            per_expert = [sum(col) for col in zip(*[row for rank in r["expert_load"] for row in rank])]
            print(f"    tokens per expert (all MoE layers): {per_expert}")
    print(f"Ray dashboard: {st['dashboard'] or 'off'}")
    for url in st["metrics"]:
        print(f"Prometheus metrics: {url}")
    print(f"Grafana: {st['grafana']}")
    print("For the ray CLI (ray list actors, ray summary actors, ray status):")
    print("  export " + " ".join(f"{k}={v}" for k, v in st["ray_env"].items()))
    return 0


def down_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="expertmesh down")
    p.add_argument("--name", default="expertmesh")
    p.add_argument("--address")
    args = p.parse_args(argv)
    try:
        print(json.dumps(down(args.name, args.address)))
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
