"""KubeRay manifests rendered from the same YAML config that `expertmesh up` reads, so the local and
the Kubernetes deployments cannot drift.

    expertmesh manifests render configs/deepseek-r1-a100.yaml --overlay deepseek-r1-a100 > r1.yaml
    expertmesh manifests validate r1.yaml manifests/overlays/deepseek-r1-a100

A profile holds what the config cannot know: the image, the pod shapes of a node pool, node
selectors and tolerations, where the weights live. One profile exists per kustomize overlay in
manifests/overlays/ (plus "base"), and tests/test_manifests.py checks that
`render_documents(config, overlay)` equals `kubectl kustomize manifests/overlays/<overlay>`.

Placement on Kubernetes: the Router deployment (expertmesh's own gRPC and HTTP servers) is pinned
to the head pod by a custom Ray resource, because clients reach it through a Service that selects
the head; engine replicas and their rank actors go to the worker pods (the head has num-cpus 0).
Ray Serve's own HTTP proxy runs on the head only, on port 8100 (the container port named "serve"
that KubeRay health-checks), leaving 8000 to the Router's HTTP server.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expertmesh.cluster.config import ConfigError, DeployConfig, config_from_dict, load_config

log = logging.getLogger(__name__)

SERVE_IMPORT_PATH = "expertmesh.cluster.serve.app:build_app"
RAY_VERSION = "2.60.0"
SERVE_PROXY_PORT = 8100  # Ray Serve's HTTP proxy; KubeRay finds it by the port name "serve"
ROUTER_RESOURCE = "expertmesh_router"  # custom Ray resource only the head offers
TLS_DIR = "/etc/expertmesh/tls"
# Ports the head already uses: GCS, dashboard, Ray client, metrics, Serve proxy, dashboard agent.
RESERVED_PORTS = {6379: "gcs-server", 8265: "dashboard", 10001: "client", 8080: "metrics",
                  SERVE_PROXY_PORT: "serve", 52365: "dashboard agent"}
POD_USER, POD_GROUP = 1000, 100  # the rayproject/ray images' "ray" user and "users" group


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("expertmesh")
    except Exception:  # not installed: a source checkout on sys.path
        return "0.1.0"


IMAGE = "expertmesh/expertmesh"
CPU_IMAGE = f"{IMAGE}:{_version()}-cpu"
CUDA_IMAGE = f"{IMAGE}:{_version()}-cuda"


@dataclass(frozen=True)
class PodShape:
    cpu: str  # Kubernetes quantities; requests = limits (Guaranteed QoS: no CPU throttling surprises)
    memory: str
    shm: str  # /dev/shm (memory-backed): Ray's object store and NCCL's intra-node buffers
    object_store_bytes: int  # below shm, so Ray never falls back to a disk-backed store


@dataclass(frozen=True)
class Profile:
    """What a Kubernetes node pool adds to a DeployConfig: image, pod shapes, placement, weights."""

    name: str
    image: str
    head: PodShape
    worker: PodShape
    worker_group: str
    ranks_per_pod: int
    gpus_per_pod: int = 0
    model_dir: str = "/home/ray/checkpoints"  # the CPU images carry the tiny checkpoint here
    model_claim: str | None = None  # a PersistentVolumeClaim mounted read-only at model_dir
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()
    spread_workers: bool = False  # one worker pod per Kubernetes node where possible
    idle_timeout_s: int = 60
    env: tuple[tuple[str, str], ...] = (("GLOO_SOCKET_IFNAME", "eth0"),)


GIB = 2**30
PROFILES: dict[str, Profile] = {
    # A generic CPU cluster: the tiny model, two ranks per worker pod.
    "base": Profile(
        name="base",
        image=CPU_IMAGE,
        head=PodShape(cpu="2", memory="4Gi", shm="1Gi", object_store_bytes=GIB // 2),
        worker=PodShape(cpu="4", memory="8Gi", shm="2Gi", object_store_bytes=GIB),
        worker_group="cpu",
        ranks_per_pod=2,
    ),
    # A laptop (kind, minikube): the same, in smaller pods.
    "tiny-cpu": Profile(
        name="tiny-cpu",
        image=CPU_IMAGE,
        head=PodShape(cpu="1", memory="3Gi", shm="512Mi", object_store_bytes=GIB // 4),
        worker=PodShape(cpu="2", memory="4Gi", shm="1Gi", object_store_bytes=GIB // 2),
        worker_group="cpu",
        ranks_per_pod=2,
    ),
    # Expert parallelism across nodes on CPUs: one rank per worker pod, pods spread over nodes.
    "multinode-ep": Profile(
        name="multinode-ep",
        image=CPU_IMAGE,
        head=PodShape(cpu="2", memory="4Gi", shm="1Gi", object_store_bytes=GIB // 2),
        worker=PodShape(cpu="2", memory="4Gi", shm="1Gi", object_store_bytes=GIB // 2),
        worker_group="cpu",
        ranks_per_pod=1,
        spread_workers=True,
    ),
    # DeepSeek-R1 on nodes with 8 x A100 80GB, 96 vCPUs and >= 1 TiB of RAM (p4de.24xlarge,
    # a2-ultragpu-8g, ND96amsr_A100_v4). Sizes explained in manifests/overlays/deepseek-r1-a100.
    "deepseek-r1-a100": Profile(
        name="deepseek-r1-a100",
        image=CUDA_IMAGE,
        head=PodShape(cpu="8", memory="32Gi", shm="8Gi", object_store_bytes=4 * GIB),
        worker=PodShape(cpu="88", memory="512Gi", shm="24Gi", object_store_bytes=16 * GIB),
        worker_group="a100",
        ranks_per_pod=8,
        gpus_per_pod=8,
        model_dir="/models",
        model_claim="deepseek-r1-weights",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        idle_timeout_s=600,
        env=(("GLOO_SOCKET_IFNAME", "eth0"), ("NCCL_SOCKET_IFNAME", "eth0")),
    ),
}


class RenderError(ValueError):
    """The config and the profile cannot make a working deployment (names the config key)."""


def _quantity_value(q: str) -> float:
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", q)
    if not m or m.group(2) not in units:
        raise RenderError(f"unsupported quantity {q!r}")
    return float(m.group(1)) * units[m.group(2)]


def _profile(overlay: str | None) -> Profile:
    name = overlay or "base"
    if name not in PROFILES:
        raise RenderError(f"unknown overlay {name!r}; choose one of {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


def pods_per_replica(cfg: DeployConfig, profile: Profile) -> int:
    """Worker pods one engine replica (an EP group of ep_size ranks + its engine) occupies."""
    p = cfg.parallel
    if p.gpus_per_rank and not profile.gpus_per_pod:
        raise RenderError(f"parallel.accelerator: {p.accelerator!r} needs GPU worker pods; overlay {profile.name!r} has none")
    if not p.gpus_per_rank and profile.gpus_per_pod:
        raise RenderError(f"parallel.accelerator: 'cpu' would leave overlay {profile.name!r}'s GPUs idle; use accelerator cuda")
    if profile.gpus_per_pod and profile.ranks_per_pod * p.gpus_per_rank > profile.gpus_per_pod:
        raise RenderError(f"parallel.gpus_per_rank: {profile.ranks_per_pod} ranks need more than the pod's {profile.gpus_per_pod} GPUs")
    pod_cpus = _quantity_value(profile.worker.cpu)
    need = min(profile.ranks_per_pod, p.ep_size) * p.cpus_per_rank + p.engine_cpus
    if need > pod_cpus:
        raise RenderError(
            f"parallel.cpus_per_rank: {min(profile.ranks_per_pod, p.ep_size)} ranks x {p.cpus_per_rank} CPUs + engine "
            f"{p.engine_cpus} = {need} exceed a {profile.name} worker pod's {pod_cpus:g} CPUs"
        )
    return math.ceil(p.ep_size / profile.ranks_per_pod)


def _check_ports(cfg: DeployConfig) -> None:
    for key, port in (("router.grpc_port", cfg.router.grpc_port), ("router.http_port", cfg.router.http_port)):
        if port in RESERVED_PORTS:
            raise RenderError(f"{key}: {port} is the head pod's {RESERVED_PORTS[port]} port; choose another")


def kube_config(cfg: DeployConfig, profile: Profile) -> dict[str, Any]:
    """The expertmesh config as the pods see it: weights under the profile's model folder, the
    router listening on the pod address, TLS files from the mounted Secret, Ray already running."""
    data = cfg.to_dict()
    data["model"]["checkpoint"] = f"{profile.model_dir}/{Path(data['model']['checkpoint']).name}"
    data["router"]["host"] = "0.0.0.0"
    if data["router"]["tls"]:
        data["router"]["tls"] = {"cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key"}
    data["ray"]["address"] = None
    return data


def serve_config(cfg: DeployConfig, overlay: str | None = None) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2): expertmesh's app with the config as its only arg."""
    profile = _profile(overlay)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PROXY_PORT},
        "applications": [
            {
                "name": cfg.name,
                "route_prefix": "/",
                "import_path": SERVE_IMPORT_PATH,
                "args": {"config": kube_config(cfg, profile)},
                "deployments": [
                    {
                        "name": "Router",
                        "num_replicas": 1,
                        "ray_actor_options": {"num_cpus": 0, "resources": {ROUTER_RESOURCE: 1}},
                    }
                ],
            }
        ],
    }


# ---------------------------------------------------------------- pod templates


def _labels(cfg: DeployConfig, component: str | None = None, instance: str | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/part-of": "expertmesh", "app.kubernetes.io/instance": instance or cfg.name}
    if component:
        out["app.kubernetes.io/component"] = component
    return out


def _resources(shape: PodShape, gpus: int = 0) -> dict[str, Any]:
    amounts: dict[str, str] = {"cpu": shape.cpu, "memory": shape.memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"limits": dict(amounts), "requests": dict(amounts)}


def _probe(command: str, failure_threshold: int) -> dict[str, Any]:
    return {
        "exec": {"command": ["bash", "-c", command]},
        "initialDelaySeconds": 30,
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "failureThreshold": failure_threshold,
    }


RAYLET_OK = "wget -T 4 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
GCS_OK = "wget -T 4 -q -O- http://localhost:8265/api/gcs_healthz | grep success"
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": POD_USER,
    "runAsGroup": POD_GROUP,
    "fsGroup": POD_GROUP,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _volumes(profile: Profile, shape: PodShape, tls_secret: str | None) -> tuple[list[dict], list[dict]]:
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shape.shm}}]
    if profile.model_claim:
        mounts.append({"name": "models", "mountPath": profile.model_dir, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": profile.model_claim, "readOnly": True}})
    if tls_secret:
        mounts.append({"name": "router-tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "router-tls", "secret": {"secretName": tls_secret}})
    return mounts, volumes


def _env(cfg: DeployConfig, profile: Profile, head: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in profile.env]
    if head and cfg.router.auth:
        env.append({
            "name": cfg.router.auth.token_env,
            "valueFrom": {"secretKeyRef": {"name": f"{cfg.name}-api-token", "key": "token"}},
        })
    return env


def _head_spec(cfg: DeployConfig, profile: Profile, instance: str) -> dict[str, Any]:
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8080, "name": "metrics"},
        {"containerPort": SERVE_PROXY_PORT, "name": "serve"},
        {"containerPort": cfg.router.grpc_port, "name": "grpc"},
    ]
    if cfg.router.http_port:
        ports.append({"containerPort": cfg.router.http_port, "name": "http"})
    tls_secret = f"{cfg.name}-router-tls" if cfg.router.tls else None
    mounts, volumes = _volumes(profile, profile.head, tls_secret)
    container = {
        "name": "ray-head",
        "image": profile.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "env": _env(cfg, profile, head=True),
        "resources": _resources(profile.head),
        "readinessProbe": _probe(f"{RAYLET_OK} && {GCS_OK}", 10),
        "livenessProbe": _probe(f"{RAYLET_OK} && {GCS_OK}", 120),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }
    return {
        "rayStartParams": {
            "num-cpus": "0",  # nothing but the Router, Serve's controller and proxy: all 0-CPU
            "resources": f'"{{\\"{ROUTER_RESOURCE}\\": 1}}"',
            "object-store-memory": str(profile.head.object_store_bytes),
        },
        "serviceType": "ClusterIP",  # the dashboard stays inside the cluster: reach it by port-forward
        "template": {"metadata": {"labels": _labels(cfg, "head", instance)}, "spec": spec},
    }


def _worker_group(cfg: DeployConfig, profile: Profile, instance: str, interactive: bool) -> dict[str, Any]:
    per_replica = pods_per_replica(cfg, profile)
    a = cfg.autoscaling
    mounts, volumes = _volumes(profile, profile.worker, None)
    container = {
        "name": "ray-worker",
        "image": profile.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"containerPort": 8080, "name": "metrics"}],
        "env": _env(cfg, profile, head=False),
        "resources": _resources(profile.worker, profile.gpus_per_pod),
        "readinessProbe": _probe(RAYLET_OK, 10),
        "livenessProbe": _probe(RAYLET_OK, 120),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }
    if profile.node_selector:
        spec["nodeSelector"] = dict(profile.node_selector)
    if profile.tolerations:
        spec["tolerations"] = [dict(t) for t in profile.tolerations]
    labels = _labels(cfg, "worker", instance)
    if profile.spread_workers:
        spec["topologySpreadConstraints"] = [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(labels)},
        }]
    start: dict[str, str] = {"object-store-memory": str(profile.worker.object_store_bytes)}
    if cfg.parallel.accelerator_type:
        # The autoscaler cannot infer GPU models from a pod spec: declare what Ray detects at runtime.
        start["resources"] = f'"{{\\"accelerator_type:{cfg.parallel.accelerator_type}\\": 1}}"'
    low = 0 if interactive else a.min_replicas * per_replica
    return {
        "groupName": profile.worker_group,
        "replicas": low if interactive else a.initial_replicas * per_replica,
        "minReplicas": low,
        "maxReplicas": a.max_replicas * per_replica,
        "rayStartParams": start,
        "template": {"metadata": {"labels": labels}, "spec": spec},
    }


def _cluster_spec(cfg: DeployConfig, profile: Profile, instance: str, interactive: bool = False) -> dict[str, Any]:
    _check_ports(cfg)
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": profile.idle_timeout_s,
            "imagePullPolicy": "IfNotPresent",
            "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}, "requests": {"cpu": "500m", "memory": "512Mi"}},
            "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        },
        "authOptions": {"mode": "token"},  # Ray 2.60 token auth; KubeRay creates and mounts the token
        "headGroupSpec": _head_spec(cfg, profile, instance),
        "workerGroupSpecs": [_worker_group(cfg, profile, instance, interactive)],
    }


# ---------------------------------------------------------------- documents


def _checked(cfg: DeployConfig) -> DeployConfig:
    """Render only configs whose ep_size fits the model (checkpoint, preset or declared count)."""
    return config_from_dict(cfg.to_dict(), source=cfg._source, lines=cfg._lines)


def render_rayservice(config: DeployConfig, overlay: str | None = None) -> dict[str, Any]:
    """The RayService for this config on the overlay's node pool (None: the base profile)."""
    cfg = _checked(config)
    profile = _profile(overlay)
    serve_yaml = yaml.dump(serve_config(cfg, overlay), Dumper=_Dumper, sort_keys=False, width=100)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": cfg.name, "labels": _labels(cfg)},
        "spec": {
            # Scarce GPUs: never build a second cluster next to the serving one (NewCluster would
            # need twice the A100s and wait forever). serveConfigV2 changes roll in place; image or
            # pod changes are a planned restart (docs/kubernetes.md).
            "upgradeStrategy": {"type": "None"},
            "serveConfigV2": serve_yaml,
            "rayClusterConfig": _cluster_spec(cfg, profile, cfg.name),
        },
    }


def render_raycluster(config: DeployConfig, overlay: str | None = None) -> dict[str, Any]:
    """A RayCluster of the same shape for interactive use (`serve deploy`, `ray job submit`,
    `expertmesh up --address`): no Serve app, workers start at 0 and follow demand."""
    cfg = _checked(config)
    name = f"{cfg.name}-dev"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "labels": _labels(cfg, instance=name)},
        "spec": _cluster_spec(cfg, _profile(overlay), name, interactive=True),
    }


def render_router_service(config: DeployConfig, interactive: bool = False) -> dict[str, Any]:
    """A Service for the Router's gRPC (h2c) and HTTP ports on the head pod. KubeRay's own serve
    Service cannot carry them: it keeps only the port named "serve" and selects every worker."""
    cfg = config
    instance = f"{cfg.name}-dev" if interactive else cfg.name
    selector = {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": "head"}
    if not interactive:
        selector["ray.io/serve"] = "true"  # KubeRay sets it once Serve on the head is healthy
    grpc_port: dict[str, Any] = {"name": "grpc", "port": cfg.router.grpc_port, "targetPort": "grpc", "protocol": "TCP"}
    if not cfg.router.tls:
        grpc_port["appProtocol"] = "kubernetes.io/h2c"  # cleartext HTTP/2
    ports = [grpc_port]
    if cfg.router.http_port:
        ports.append({"name": "http", "port": cfg.router.http_port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{instance}-router", "labels": _labels(cfg, "router", instance)},
        "spec": {"type": "ClusterIP", "selector": selector, "ports": ports},
    }


def render_documents(config: DeployConfig, overlay: str | None = None, kind: str = "RayService") -> list[dict[str, Any]]:
    """Everything to apply: the RayService (or RayCluster) and the Router's Service."""
    if kind.lower() == "raycluster":
        return [render_raycluster(config, overlay), render_router_service(config, interactive=True)]
    return [render_rayservice(config, overlay), render_router_service(config)]


class _Dumper(yaml.SafeDumper):
    """Block style, literal blocks for multi-line strings (serveConfigV2), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(docs: dict[str, Any] | list[dict[str, Any]]) -> str:
    """YAML text of one document or a `---`-separated stream, keys in render order."""
    items = docs if isinstance(docs, list) else [docs]
    return yaml.dump_all(items, Dumper=_Dumper, sort_keys=False, width=4096, default_flow_style=False)


# ---------------------------------------------------------------- command line


def kustomize_build(path: str | Path) -> str:
    """`kubectl kustomize PATH` (or `kustomize build`), for validating overlays."""
    for exe, args in (("kubectl", ["kustomize"]), ("kustomize", ["build"])):
        if shutil.which(exe):
            out = subprocess.run([exe, *args, str(path)], capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"{exe} {' '.join(args)} {path} failed: {out.stderr.strip()}")
            return out.stdout
    raise FileNotFoundError("neither kubectl nor kustomize is on PATH")


def _validate_paths(paths: list[str]) -> int:
    from expertmesh.cluster.kube import validate as kube_validate

    failures = 0
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (path / "kustomization.yaml").is_file():
            problems = kube_validate.validate_yaml(kustomize_build(path), source=str(path))
        elif path.is_dir():
            problems = []
            for file in sorted(path.rglob("*.yaml")):
                if file.name != "kustomization.yaml" and "overlays" not in file.parts:
                    problems += kube_validate.validate_file(file)
        else:
            problems = kube_validate.validate_file(path)
        for problem in problems:
            print(f"INVALID {problem}")
        print(f"{'ok' if not problems else 'FAILED'}: {path}")
        failures += bool(problems)
    return 1 if failures else 0


def manifests_main(argv: list[str] | None = None) -> int:
    """`expertmesh manifests render|validate|profiles`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="expertmesh manifests", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    render = sub.add_parser("render", help="print the KubeRay manifests for a config")
    render.add_argument("config")
    render.add_argument("--overlay", default=None, help=f"node-pool profile: {', '.join(sorted(PROFILES))}")
    render.add_argument("--kind", choices=["RayService", "RayCluster"], default="RayService")
    render.add_argument("--serve-config", action="store_true", help="print only the Ray Serve config (for `serve deploy`)")
    render.add_argument("-o", "--output", help="write to this file instead of stdout")
    check = sub.add_parser("validate", help="validate manifest files, folders or kustomize overlays")
    check.add_argument("paths", nargs="+")
    sub.add_parser("profiles", help="list the overlays' node-pool profiles")
    args = parser.parse_args(argv)

    if args.cmd == "profiles":
        for name, p in sorted(PROFILES.items()):
            print(f"{name}: image {p.image}, worker pods {p.worker.cpu} CPU / {p.worker.memory}"
                  f"{f' / {p.gpus_per_pod} GPU' if p.gpus_per_pod else ''}, {p.ranks_per_pod} ranks per pod")
        return 0
    if args.cmd == "validate":
        return _validate_paths(args.paths)
    try:
        cfg = load_config(args.config)
        if args.serve_config:
            text = yaml.dump(serve_config(_checked(cfg), args.overlay), Dumper=_Dumper, sort_keys=False, width=100)
        else:
            from expertmesh.cluster.kube import validate as kube_validate

            docs = render_documents(cfg, args.overlay, args.kind)
            problems = kube_validate.validate_documents(docs)
            if problems:
                for problem in problems:
                    print(f"INVALID {problem}", file=sys.stderr)
                return 1
            text = dump_yaml(docs)
    except (ConfigError, RenderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
