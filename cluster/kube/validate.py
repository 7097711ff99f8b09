"""Validate KubeRay manifests offline, as `kubectl apply --validate=strict` against a cluster with
KubeRay v1.7.0's CRDs would, plus the checks the KubeRay operator and the pod admission make later.

No API server runs where expertmesh is developed, and a manifest that nobody validated fails at
2 a.m. on a cluster of scarce GPUs. So this module re-creates the server's side from the CRDs'
openAPIV3Schema:

- structural defaulting (`default:`), before anything else, exactly like the API server;
- strict field validation: `additionalProperties: false` wherever a schema lists `properties`
  (unless `x-kubernetes-preserve-unknown-fields`), so a typo'd field is an error, not dropped;
- OpenAPI 3.0 types and formats (int32/int64), `x-kubernetes-int-or-string`, quantity patterns;
- `x-kubernetes-list-type` set/map (duplicate items or map keys, e.g. a container port, fail);
- `x-kubernetes-validations` CEL rules (cel-python), skipping transition rules (`oldSelf`);
- metadata: name (DNS-1123 subdomain), namespace, label keys and values;
- unknown ray.io kinds or versions are refused;
- KubeRay operator rules (RayService/RayCluster names are DNS-1035 labels of at most 47/53
  characters, containers present, min <= max replicas, ...) and pod rules (extended resources
  such as nvidia.com/gpu: whole numbers, requests equal to limits);
- an embedded `serveConfigV2` against Ray Serve's ServeDeploySchema (unknown keys refused too),
  and expertmesh's own application args against DeployConfig.

A plain `v1 Service` is checked against the Service schema embedded in the RayService CRD
(`spec.serveService`), which is the core Service type.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
VENDORED_CRDS = PACKAGE_DIR / "assets" / "kuberay-crds"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayservices.yaml", "ray.io_rayjobs.yaml")
SHARED_ENV = "EXPERTMESH_SHARED_DIR"
EXPERTMESH_IMPORT_PATH = "expertmesh.cluster.serve.app:build_app"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
MAX_RAYCLUSTER_NAME = 53  # KubeRay: 63 - len("-serve-svc")
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6  # it appends "-xxxxx" for the RayCluster
RAYSERVICE_UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
RAYCLUSTER_UPGRADE_TYPES = ("Recreate", "None")


class CRDsNotFound(FileNotFoundError):
    """Neither the vendored copy nor ../shared/external/kuberay-crds holds the CRDs."""


@dataclass(frozen=True)
class Problem:
    """One validation failure: where (document, field path) and what."""

    doc: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.doc}: " if self.doc else ""
        return f"{where}{self.path + ': ' if self.path else ''}{self.message}"


class ManifestInvalid(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("manifest is invalid:\n  " + "\n  ".join(str(p) for p in problems))


# ---------------------------------------------------------------- locating and loading CRDs


def repo_root() -> Path:
    """The checkout holding this package (cluster/kube/ sits two levels below its top)."""
    return PACKAGE_DIR.parent.parent


def shared_dir() -> Path:
    """The project's shared folder: $EXPERTMESH_SHARED_DIR, else <repo>/../shared."""
    env = os.environ.get(SHARED_ENV)
    return Path(env) if env else repo_root().parent / "shared"


def find_crd_dir(explicit: str | Path | None = None) -> Path:
    """Where the KubeRay CRDs are: an explicit folder, the copy vendored in the package (preferred,
    so validation never depends on what sits beside the checkout), else the shared folder."""
    candidates = [Path(explicit)] if explicit else [VENDORED_CRDS, shared_dir() / "external" / "kuberay-crds"]
    for folder in candidates:
        if all((folder / name).is_file() for name in CRD_FILES):
            return folder
    raise CRDsNotFound(
        "KubeRay CRDs not found in " + ", ".join(str(c) for c in candidates)
        + f" (expected {', '.join(CRD_FILES)}; set {SHARED_ENV} to the folder holding external/kuberay-crds)"
    )


@dataclass(frozen=True)
class CRDSchemas:
    """openAPIV3Schema by (apiVersion, kind), and the kinds/versions the ray.io group serves."""

    schemas: dict[tuple[str, str], dict[str, Any]]
    kinds: dict[str, tuple[str, ...]]  # kind -> served versions
    group: str = "ray.io"


@functools.lru_cache(maxsize=4)
def load_crds(crd_dir: str | None = None) -> CRDSchemas:
    folder = find_crd_dir(crd_dir)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    kinds: dict[str, tuple[str, ...]] = {}
    group = "ray.io"
    for name in CRD_FILES:
        with open(folder / name) as fh:
            crd = yaml.load(fh, Loader=loader)
        spec = crd["spec"]
        group = spec["group"]
        kind = spec["names"]["kind"]
        served = []
        for version in spec["versions"]:
            if not version.get("served"):
                continue
            served.append(version["name"])
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
        kinds[kind] = tuple(served)
    log.debug("loaded KubeRay CRDs from %s: %s", folder, kinds)
    return CRDSchemas(schemas, kinds, group)


def core_service_schema(crds: CRDSchemas) -> dict[str, Any]:
    """The core v1 Service schema, as embedded in the RayService CRD (spec.serveService)."""
    return crds.schemas[("ray.io/v1", "RayService")]["properties"]["spec"]["properties"]["serveService"]


# ---------------------------------------------------------------- schema walking


def _children(schema: dict[str, Any], value: Any) -> Iterable[tuple[str | int, dict[str, Any], Any]]:
    """(key, sub-schema, sub-value) for every present child of value that the schema describes."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                yield key, props[key], sub
            elif isinstance(extra, dict):
                yield key, extra, sub
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield i, schema["items"], sub


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server does before validation (in place; returns value)."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
    for _, sub_schema, sub_value in _children(schema, value):
        apply_defaults(sub_schema, sub_value)
    return value


def strict_schema(schema: Any) -> Any:
    """A copy of the schema with additionalProperties: false wherever properties are listed
    (kubectl --validate=strict: unknown fields are errors), and int-or-string spelled out."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k not in ("default", "enum", "example") else v for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.lru_cache(maxsize=16)
def _validator(key: str) -> Any:
    from openapi_schema_validator import OAS30Validator

    schema = _SCHEMA_REGISTRY[key]
    return OAS30Validator(strict_schema(schema), format_checker=OAS30Validator.FORMAT_CHECKER)


_SCHEMA_REGISTRY: dict[str, dict[str, Any]] = {}


def _schema_errors(schema_key: str, schema: dict[str, Any], obj: Any) -> list[tuple[str, str]]:
    _SCHEMA_REGISTRY.setdefault(schema_key, schema)
    errors = []
    for err in _validator(schema_key).iter_errors(obj):
        path = ""
        for part in err.absolute_path:
            path = _join(path, part)
        message = err.message
        if err.validator == "additionalProperties":
            unexpected = re.findall(r"'([^']+)'", message.split("(")[-1]) if "(" in message else []
            for field in unexpected or ["?"]:
                errors.append((_join(path, field), f'unknown field "{field}"'))
            continue
        if err.validator == "anyOf" and err.context:
            # int-or-string / quantity: report the most useful branch failure
            message = f"{err.instance!r} is not an integer or a string" if not isinstance(err.instance, (int, str)) else message
        if err.validator == "pattern" and isinstance(err.instance, str):
            if err.validator_value == QUANTITY.pattern:
                message = f"Invalid value: {err.instance!r}: not a Kubernetes quantity (e.g. 1, 500m, 16Gi)"
            else:
                message = f"Invalid value: {err.instance!r}: does not match {err.validator_value!r}"
        errors.append((path, message))
    return errors


def _list_type_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[tuple[str, str]]:
    """x-kubernetes-list-type: set items and map keys must be unique; map keys must be present."""
    errors: list[tuple[str, str]] = []
    if isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set":
            seen = set()
            for i, item in enumerate(value):
                token = json.dumps(item, sort_keys=True)
                if token in seen:
                    errors.append((f"{path}[{i}]", f"Duplicate value: {item!r}"))
                seen.add(token)
        elif list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen_keys: dict[tuple, int] = {}
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                missing = [k for k in keys if k not in item]
                if missing:
                    errors.append((f"{path}[{i}]", f"Required value: list map key(s) {missing} missing"))
                    continue
                ident = tuple(json.dumps(item[k], sort_keys=True) for k in keys)
                if ident in seen_keys:
                    shown = ", ".join(f"{k}: {item[k]!r}" for k in keys)
                    errors.append((f"{path}[{i}]", f"Duplicate value: {{{shown}}} (same as {path}[{seen_keys[ident]}])"))
                else:
                    seen_keys[ident] = i
    for key, sub_schema, sub_value in _children(schema, value):
        errors += _list_type_errors(sub_schema, sub_value, _join(path, key))
    return errors


@functools.lru_cache(maxsize=256)
def _cel_program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[tuple[str, str]]:
    """Evaluate x-kubernetes-validations rules (cel-python); transition rules (oldSelf) need the
    previous object and are skipped, as on create."""
    import celpy

    errors: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        expr = rule.get("rule", "")
        if "oldSelf" in expr:
            continue
        try:
            result = _cel_program(expr).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # a rule that cannot evaluate is reported, not ignored
            errors.append((path, f"CEL rule {expr!r} could not be evaluated: {exc}"))
            continue
        if isinstance(result, Exception) or not bool(result):
            errors.append((path, f"Invalid value: {rule.get('message') or 'failed rule: ' + expr}"))
    for key, sub_schema, sub_value in _children(schema, value):
        errors += _cel_errors(sub_schema, sub_value, _join(path, key))
    return errors


# ---------------------------------------------------------------- metadata and object checks


def _metadata_errors(meta: Any) -> list[tuple[str, str]]:
    if not isinstance(meta, dict):
        return [("metadata", "Required value: metadata must be a mapping")]
    errors = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        errors.append(("metadata.name", "Required value: name or generateName is required"))
    elif name is not None and (not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name)):
        errors.append(("metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of "
                       "lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"))
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not DNS1123_LABEL.match(ns)):
        errors.append(("metadata.namespace", f"Invalid value: {ns!r}: not a DNS-1123 label"))
    for field in ("labels", "annotations"):
        entries = meta.get(field)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            errors.append((f"metadata.{field}", "must be a map of strings"))
            continue
        for key, val in entries.items():
            if not _qualified_name_ok(str(key)):
                errors.append((f"metadata.{field}", f"Invalid value: {key!r}: not a qualified name"))
            if not isinstance(val, str):
                errors.append((f"metadata.{field}.{key}", f"must be a string, got {val!r}"))
            elif field == "labels" and (len(val) > 63 or not LABEL_VALUE.match(val)):
                errors.append((f"metadata.labels.{key}", f"Invalid value: {val!r}: not a valid label value"))
    return errors


def _qualified_name_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and LABEL_NAME.match(name) is not None


def _pod_templates(kind: str, spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster, base = spec, "spec"
    if kind == "RayService":
        cluster, base = spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig"
    elif kind == "RayJob":
        cluster, base = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
    out = []
    head = (cluster.get("headGroupSpec") or {}).get("template")
    if isinstance(head, dict):
        out.append((f"{base}.headGroupSpec.template", head))
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if isinstance(group, dict) and isinstance(group.get("template"), dict):
            out.append((f"{base}.workerGroupSpecs[{i}].template", group["template"]))
    return out


def _is_extended_resource(name: str) -> bool:
    return "/" in name and not name.startswith(("kubernetes.io/", "requests.")) and not name.startswith("hugepages-")


def _pod_errors(path: str, template: dict[str, Any]) -> list[tuple[str, str]]:
    """Rules the API server applies when KubeRay creates the pods (too late to learn at 2 a.m.)."""
    errors = []
    pod = template.get("spec") or {}
    containers = pod.get("containers") or []
    if "containers" in pod and not containers:
        errors.append((f"{path}.spec.containers", "Required value: at least one container"))
    port_names: dict[str, str] = {}
    for c_i, container in enumerate(list(containers) + list(pod.get("initContainers") or [])):
        cpath = f"{path}.spec.containers[{c_i}]" if c_i < len(containers) else f"{path}.spec.initContainers[{c_i - len(containers)}]"
        if not isinstance(container, dict):
            continue
        if not container.get("image"):
            errors.append((f"{cpath}.image", "Required value: container image"))
        for p_i, port in enumerate(container.get("ports") or []):
            name = port.get("name") if isinstance(port, dict) else None
            if name is None:
                continue
            if len(name) > 15 or not IANA_SVC_NAME.match(name) or not re.search("[a-z]", name) or "--" in name:
                errors.append((f"{cpath}.ports[{p_i}].name", f"Invalid value: {name!r}: must be an IANA_SVC_NAME (at most 15 lowercase characters)"))
            elif name in port_names:
                errors.append((f"{cpath}.ports[{p_i}].name", f"Duplicate value: {name!r} (also {port_names[name]})"))
            else:
                port_names[name] = f"{cpath}.ports[{p_i}]"
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        for field, values in (("limits", limits), ("requests", requests)):
            for res, qty in values.items():
                if isinstance(qty, str) and not QUANTITY.match(qty):
                    continue  # already reported by the schema
                if _is_extended_resource(res) and not re.fullmatch(r"\+?[0-9]+", str(qty)):
                    errors.append((f"{cpath}.resources.{field}.{res}", f"Invalid value: {qty!r}: must be an integer"))
        for res, qty in requests.items():
            valid = all(QUANTITY.match(str(q)) for q in (qty, limits.get(res, 0)))
            if _is_extended_resource(res) and valid:
                if res not in limits:
                    errors.append((f"{cpath}.resources.limits.{res}", "Required value: extended resources need a limit"))
                elif str(limits[res]) != str(qty):
                    errors.append((f"{cpath}.resources.requests.{res}", f"Invalid value: {qty!r}: must equal the limit {limits[res]!r}"))
    return errors


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _operator_errors(kind: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """What the KubeRay operator refuses (ray-operator/controllers/ray/utils/validation.go)."""
    errors: list[tuple[str, str]] = []
    name = (obj.get("metadata") or {}).get("name") or ""
    spec = obj.get("spec") or {}
    limit = {"RayService": MAX_RAYSERVICE_NAME, "RayCluster": MAX_RAYCLUSTER_NAME}.get(kind)
    if limit and name and (len(name) > limit or not DNS1035_LABEL.match(name)):
        errors.append(("metadata.name", f"KubeRay refuses {name!r}: a {kind} name must be a DNS-1035 label of at most {limit} characters"))
    cluster = spec.get("rayClusterConfig") if kind == "RayService" else spec if kind == "RayCluster" else spec.get("rayClusterSpec")
    base = {"RayService": "spec.rayClusterConfig", "RayCluster": "spec"}.get(kind, "spec.rayClusterSpec")
    if isinstance(cluster, dict):
        autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
        head = cluster.get("headGroupSpec") or {}
        if head.get("rayStartParams") and head.get("resources") and any(
            k in head["rayStartParams"] for k in ("num-cpus", "num-gpus", "memory", "resources")
        ):
            errors.append((f"{base}.headGroupSpec", "resources set in both rayStartParams and resources"))
        names = set()
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            gpath = f"{base}.workerGroupSpecs[{i}]"
            gname = group.get("groupName")
            if gname in names:
                errors.append((f"{gpath}.groupName", f"Duplicate value: {gname!r}"))
            names.add(gname)
            lo, hi, rep = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                errors.append((gpath, f"minReplicas {lo} is greater than maxReplicas {hi}"))
            if isinstance(rep, int) and isinstance(lo, int) and isinstance(hi, int) and not lo <= rep <= hi:
                errors.append((f"{gpath}.replicas", f"{rep} is outside [minReplicas {lo}, maxReplicas {hi}]"))
            for field in ("minReplicas", "maxReplicas"):
                if isinstance(group.get(field), int) and group[field] < 0:
                    errors.append((f"{gpath}.{field}", "must not be negative"))
        version = (cluster.get("autoscalerOptions") or {}).get("version")
        if autoscaling and version == "v2":
            for tpath, template in _pod_templates(kind, spec):
                policy = (template.get("spec") or {}).get("restartPolicy")
                if policy not in (None, "", "Never"):
                    errors.append((f"{tpath}.spec.restartPolicy", "must be Never or unset with autoscaler v2"))
        if (cluster.get("authOptions") or {}).get("mode") == "token":
            rv = cluster.get("rayVersion") or ""
            if not rv or _version_tuple(rv) < (2, 52, 0):
                errors.append((f"{base}.rayVersion", f"authOptions.mode token needs rayVersion >= 2.52.0, got {rv!r}"))
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    allowed = RAYSERVICE_UPGRADE_TYPES if kind == "RayService" else RAYCLUSTER_UPGRADE_TYPES
    if upgrade is not None and kind in ("RayService", "RayCluster") and upgrade not in allowed:
        errors.append(("spec.upgradeStrategy.type", f"{upgrade!r} is not one of {list(allowed)}"))
    for tpath, template in _pod_templates(kind, spec):
        errors += _pod_errors(tpath, template)
    return errors


# ---------------------------------------------------------------- serveConfigV2


def _unknown_keys(model: Any, data: Any, path: str) -> list[tuple[str, str]]:
    if not isinstance(data, dict):
        return []
    fields = getattr(model, "model_fields", None) or getattr(model, "__fields__", {})
    known = set(fields)
    for name, info in fields.items():
        alias = getattr(info, "alias", None)
        if alias:
            known.add(alias)
    return [(_join(path, k), f'unknown field "{k}" in Ray Serve config') for k in data if k not in known]


def serve_config_errors(text: Any, head_template: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Validate serveConfigV2: YAML, Ray Serve's ServeDeploySchema (and no unknown keys, which Serve
    would silently ignore), and expertmesh's own application args against DeployConfig."""
    path = "spec.serveConfigV2"
    if not isinstance(text, str):
        return [(path, "must be a YAML string")]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [(path, f"not valid YAML: {exc}")]
    if not isinstance(data, dict):
        return [(path, "must be a YAML mapping")]
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    errors = _unknown_keys(ServeDeploySchema, data, path)
    for i, app in enumerate(data.get("applications") or []):
        errors += _unknown_keys(ServeApplicationSchema, app, f"{path}.applications[{i}]")
        for j, dep in enumerate((app or {}).get("deployments") or []):
            errors += _unknown_keys(DeploymentSchema, dep, f"{path}.applications[{i}].deployments[{j}]")
    try:
        ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = path
            for part in err["loc"]:
                loc = _join(loc, part)
            errors.append((loc, f"Ray Serve: {err['msg']}"))
    for i, app in enumerate(data.get("applications") or []):
        if isinstance(app, dict) and app.get("import_path") == EXPERTMESH_IMPORT_PATH:
            errors += expertmesh_app_errors(app, f"{path}.applications[{i}]", head_template)
    return errors


def expertmesh_app_errors(app: dict[str, Any], path: str, head_template: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The args contract of expertmesh.cluster.serve.app:build_app is exactly {config: <DeployConfig>},
    and on Kubernetes the router must listen on the pod's address, on ports the head declares."""
    from expertmesh.cluster.config import ConfigError, config_from_dict

    args = app.get("args")
    if not isinstance(args, dict) or set(args) != {"config"}:
        return [(f"{path}.args", "expertmesh's build_app takes exactly {config: <expertmesh config>}")]
    try:
        cfg = config_from_dict(args["config"], source=None)
    except ConfigError as exc:
        return [(f"{path}.args.config.{key}" if key else f"{path}.args.config", msg) for key, _, msg in exc.problems]
    errors = []
    if cfg.router.host in ("127.0.0.1", "localhost", "::1"):
        errors.append((f"{path}.args.config.router.host", f"{cfg.router.host!r} is unreachable from the Service; use 0.0.0.0"))
    if head_template is not None:
        declared = set()
        for container in (head_template.get("spec") or {}).get("containers") or []:
            for port in (container or {}).get("ports") or []:
                declared.add(port.get("containerPort"))
        for key, port in (("grpc_port", cfg.router.grpc_port), ("http_port", cfg.router.http_port)):
            if port and port not in declared:
                errors.append((f"{path}.args.config.router.{key}", f"{port} is not a containerPort of the head pod, where the Router runs"))
    return errors


# ---------------------------------------------------------------- entry points


def validate_object(obj: Any, *, crds: CRDSchemas | None = None, doc: str = "") -> list[Problem]:
    """All problems `kubectl apply --validate=strict` (and KubeRay, and pod admission) would find."""
    if not isinstance(obj, dict):
        return [Problem(doc, "", "a manifest document must be a mapping")]
    crds = crds or load_crds()
    api, kind = obj.get("apiVersion"), obj.get("kind")
    label = doc or f"{kind}/{(obj.get('metadata') or {}).get('name', '?')}"
    if not isinstance(api, str) or not isinstance(kind, str):
        return [Problem(label, "", "apiVersion and kind are required")]
    group = api.split("/")[0] if "/" in api else ""
    if api == "v1" and kind == "Service":
        schema, key = core_service_schema(crds), "core/v1/Service"
    elif group == crds.group:
        if kind not in crds.kinds:
            return [Problem(label, "kind", f'no kind "{kind}" is registered for group "{group}" (KubeRay v1.7.0 serves {sorted(crds.kinds)})')]
        version = api.split("/", 1)[1]
        if version not in crds.kinds[kind]:
            return [Problem(label, "apiVersion", f'no version "{version}" of {kind} is served (served: {list(crds.kinds[kind])})')]
        schema, key = crds.schemas[(api, kind)], f"{api}/{kind}"
    else:
        return [Problem(label, "", f"no schema for {api} {kind} here; only ray.io kinds and v1 Service are validated")]

    defaulted = apply_defaults(schema, copy.deepcopy(obj))
    found = _metadata_errors(defaulted.get("metadata"))
    found += _schema_errors(key, schema, defaulted)
    found += _list_type_errors(schema, defaulted)
    found += _cel_errors(schema, defaulted)
    if group == crds.group:
        found += _operator_errors(kind, defaulted)
        if kind == "RayService" and "serveConfigV2" in (defaulted.get("spec") or {}):
            head = ((defaulted["spec"].get("rayClusterConfig") or {}).get("headGroupSpec") or {}).get("template")
            found += serve_config_errors(defaulted["spec"]["serveConfigV2"], head)
    unique: list[Problem] = []
    for path, message in found:
        problem = Problem(label, path, message)
        if problem not in unique:
            unique.append(problem)
    return unique


def validate_documents(docs: Iterable[Any], *, crds: CRDSchemas | None = None, source: str = "") -> list[Problem]:
    problems: list[Problem] = []
    for i, obj in enumerate(docs):
        if obj is None:
            continue
        name = f"{source}#{i}" if source else ""
        if isinstance(obj, dict):
            kind, meta = obj.get("kind", "?"), obj.get("metadata") or {}
            name = f"{source + ' ' if source else ''}{kind}/{meta.get('name', '?') if isinstance(meta, dict) else '?'}"
        problems += validate_object(obj, crds=crds, doc=name)
    return problems


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (strict field validation refuses them;
    plain YAML would silently keep the last value)."""

    duplicates: list[tuple[int, str]]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                self.duplicates.append((key_node.start_mark.line + 1, str(key)))
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def validate_yaml(text: str, *, crds: CRDSchemas | None = None, source: str = "") -> list[Problem]:
    loader = _DuplicateKeyLoader(text)
    loader.duplicates = []
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
    except yaml.YAMLError as exc:
        return [Problem(source, "", f"not valid YAML: {exc}")]
    finally:
        loader.dispose()
    problems = [Problem(source, f"line {line}", f'duplicate field "{key}"') for line, key in loader.duplicates]
    return problems + validate_documents(docs, crds=crds, source=source)


def validate_file(path: str | Path, *, crds: CRDSchemas | None = None) -> list[Problem]:
    path = Path(path)
    return validate_yaml(path.read_text(), crds=crds, source=str(path))


def check(obj: Any, *, crds: CRDSchemas | None = None) -> None:
    """Raise ManifestInvalid listing every problem of one object."""
    problems = validate_object(obj, crds=crds)
    if problems:
        raise ManifestInvalid(problems)

