"""KubeRay manifests: every committed manifest, every kustomize overlay and every rendered output
validates against KubeRay v1.7.0's CRDs as `kubectl apply --validate=strict` would; broken copies
are refused; the committed manifests equal what `expertmesh manifests render` makes of the configs."""
from __future__ import annotations

import copy
import filecmp
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from expertmesh.cluster.kube import validate as kv
from expertmesh.cluster.config import load_config
from expertmesh.cluster.kube.manifests import (
    PROFILES,
    RenderError,
    dump_yaml,
    manifests_main,
    render_documents,
    render_rayservice,
    serve_config,
)

# importing ray.serve.schema warns about Ray's own pydantic usage
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
CONFIGS = REPO / "configs"
KUSTOMIZE_DIRS = sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))
# (kustomize folder, config, overlay profile, kind): the committed output each must equal
RENDERED_AS = {
    "base": ("demo.yaml", None, "RayService"),
    "overlays/tiny-cpu": ("demo.yaml", "tiny-cpu", "RayService"),
    "overlays/multinode-ep": ("multinode-cpu.yaml", "multinode-ep", "RayService"),
    "overlays/deepseek-r1-a100": ("deepseek-r1-a100.yaml", "deepseek-r1-a100", "RayService"),
    "interactive": ("deepseek-r1-a100.yaml", "deepseek-r1-a100", "RayCluster"),
}


@pytest.fixture(scope="module")
def crds() -> kv.CRDSchemas:
    return kv.load_crds()


_BUILDS: dict[Path, str] = {}


def kustomize(folder: Path) -> str:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH; `kubectl kustomize` builds the overlays")
    if folder not in _BUILDS:
        out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _BUILDS[folder] = out.stdout
    return _BUILDS[folder]


def manifest_files() -> list[Path]:
    """Complete manifests (not kustomizations, not JSON patches)."""
    files = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = list(yaml.safe_load_all(path.read_text()))
        if all(isinstance(d, dict) and "kind" in d for d in docs if d is not None):
            files.append(path)
    return files


def assert_valid(problems: list[kv.Problem]) -> None:
    assert not problems, "\n".join(str(p) for p in problems)


def comparable(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Documents by (kind, name), with serveConfigV2 parsed (formatting is not content)."""
    out = {}
    for doc in docs:
        doc = copy.deepcopy(doc)
        if doc.get("kind") == "RayService":
            doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


# ---------------------------------------------------------------- the CRDs themselves


def test_vendored_crds_are_used_and_complete(crds: kv.CRDSchemas) -> None:
    assert kv.find_crd_dir() == kv.VENDORED_CRDS
    assert crds.kinds == {"RayCluster": ("v1", "v1alpha1"), "RayService": ("v1", "v1alpha1"), "RayJob": ("v1", "v1alpha1")}


def test_vendored_crds_match_shared_copy() -> None:
    shared = kv.shared_dir() / "external" / "kuberay-crds"
    if not shared.is_dir():
        pytest.skip(f"no shared CRDs at {shared} to compare the vendored copy with")
    for name in kv.CRD_FILES:
        assert filecmp.cmp(shared / name, kv.VENDORED_CRDS / name, shallow=False), name


def test_crd_dir_falls_back_to_shared_and_explains_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "VENDORED_CRDS", tmp_path / "nowhere")
    fake_shared = tmp_path / "shared"
    (fake_shared / "external" / "kuberay-crds").mkdir(parents=True)
    monkeypatch.setenv(kv.SHARED_ENV, str(fake_shared))
    with pytest.raises(kv.CRDsNotFound, match=kv.SHARED_ENV):
        kv.find_crd_dir()
    for name in kv.CRD_FILES:
        (fake_shared / "external" / "kuberay-crds" / name).write_text("{}")
    assert kv.find_crd_dir() == fake_shared / "external" / "kuberay-crds"


def test_kuberay_samples_validate(crds: kv.CRDSchemas) -> None:
    """The validator accepts KubeRay's own samples (one omits required fields that have CRD defaults)."""
    samples = kv.shared_dir() / "external" / "kuberay-samples"
    files = sorted(samples.glob("*.yaml"))
    if not files:
        pytest.skip(f"no KubeRay samples at {samples}")
    for path in files:
        ray_docs = [d for d in yaml.safe_load_all(path.read_text()) if d and str(d.get("apiVersion", "")).startswith("ray.io/")]
        assert_valid(kv.validate_documents(ray_docs, crds=crds, source=path.name))


# ---------------------------------------------------------------- committed, built and rendered


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_files_validate(path: Path, crds: kv.CRDSchemas) -> None:
    assert_valid(kv.validate_file(path, crds=crds))


def test_every_manifest_folder_is_covered() -> None:
    rel = {str(p.relative_to(MANIFESTS)) for p in KUSTOMIZE_DIRS}
    assert rel == set(RENDERED_AS), "add the new kustomize folder to RENDERED_AS"


@pytest.mark.parametrize("folder", KUSTOMIZE_DIRS, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_kustomize_builds_validate(folder: Path, crds: kv.CRDSchemas) -> None:
    docs = list(yaml.safe_load_all(kustomize(folder)))
    assert {d["kind"] for d in docs} in ({"RayService", "Service"}, {"RayCluster", "Service"})
    assert_valid(kv.validate_documents(docs, crds=crds))


@pytest.mark.parametrize("folder", sorted(RENDERED_AS))
def test_committed_manifests_equal_rendered(folder: str) -> None:
    """The manifests cannot drift from the configs: each kustomize build equals the renderer's output."""
    config, overlay, kind = RENDERED_AS[folder]
    rendered = render_documents(load_config(CONFIGS / config), overlay, kind)
    built = list(yaml.safe_load_all(kustomize(MANIFESTS / folder)))
    assert comparable(built) == comparable(rendered), (
        f"manifests/{folder} differs from `expertmesh manifests render configs/{config}"
        f"{' --overlay ' + overlay if overlay else ''} --kind {kind}`"
    )


def test_demo_rendering_equals_committed_base_file() -> None:
    rendered = render_rayservice(load_config(CONFIGS / "demo.yaml"))
    committed = yaml.safe_load((MANIFESTS / "base" / "rayservice.yaml").read_text())
    assert comparable([committed]) == comparable([rendered])


COMBOS = [
    ("demo.yaml", None), ("demo.yaml", "tiny-cpu"), ("demo.yaml", "multinode-ep"),
    ("multinode-cpu.yaml", None), ("multinode-cpu.yaml", "multinode-ep"),
    ("deepseek-r1-a100.yaml", "deepseek-r1-a100"),
]


@pytest.mark.parametrize(("config", "overlay"), COMBOS)
@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_rendered_outputs_validate(config: str, overlay: str | None, kind: str, crds: kv.CRDSchemas) -> None:
    docs = render_documents(load_config(CONFIGS / config), overlay, kind)
    assert_valid(kv.validate_documents(docs, crds=crds))
    text = dump_yaml(docs)
    assert list(yaml.safe_load_all(text)) == docs


def test_serve_config_contract() -> None:
    cfg = load_config(CONFIGS / "deepseek-r1-a100.yaml")
    serve = serve_config(cfg, "deepseek-r1-a100")
    (app,) = serve["applications"]
    assert app["import_path"] == "expertmesh.cluster.serve.app:build_app"
    assert set(app["args"]) == {"config"}
    assert {d["name"] for d in app["deployments"]} <= {"Router", "EngineReplica"}
    embedded = app["args"]["config"]
    assert embedded["model"]["checkpoint"] == "/models/DeepSeek-R1"
    assert embedded["router"]["host"] == "0.0.0.0" and embedded["ray"]["address"] is None
    assert {k: v for k, v in embedded.items() if k not in ("model", "router", "ray")} == {
        k: v for k, v in cfg.to_dict().items() if k not in ("model", "router", "ray")
    }


def test_incompatible_profile_is_refused() -> None:
    with pytest.raises(RenderError, match="parallel.accelerator"):
        render_rayservice(load_config(CONFIGS / "deepseek-r1-a100.yaml"), "tiny-cpu")
    with pytest.raises(RenderError, match="parallel.accelerator"):
        render_rayservice(load_config(CONFIGS / "demo.yaml"), "deepseek-r1-a100")
    with pytest.raises(RenderError, match="unknown overlay"):
        render_rayservice(load_config(CONFIGS / "demo.yaml"), "h100")
    assert set(PROFILES) == {"base", "tiny-cpu", "multinode-ep", "deepseek-r1-a100"}


def test_router_port_colliding_with_ray_is_refused(tmp_path: Path) -> None:
    text = (CONFIGS / "demo.yaml").read_text().replace("http_port: 8000", "http_port: 8265")
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(text)
    with pytest.raises(RenderError, match="router.http_port: 8265 is the head pod's dashboard port"):
        render_rayservice(load_config(cfg_path))


# ---------------------------------------------------------------- broken copies are refused


@pytest.fixture(scope="module")
def r1_docs() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(kustomize(MANIFESTS / "overlays" / "deepseek-r1-a100")))


def _rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in docs if d["kind"] == "RayService"))


def _head(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _set_serve_arg(obj: dict[str, Any], section: str, key: str, value: Any) -> None:
    serve = yaml.safe_load(obj["spec"]["serveConfigV2"])
    serve["applications"][0]["args"]["config"][section][key] = value
    obj["spec"]["serveConfigV2"] = yaml.safe_dump(serve)


MUTATIONS = {
    "typo'd field": (lambda o: _worker(o).update(maxReplica=4), 'workerGroupSpecs[0].maxReplica: unknown field "maxReplica"'),
    "typo'd container field": (lambda o: _head(o).update(imagePullPolicyy="Always"), 'unknown field "imagePullPolicyy"'),
    "string for integer": (lambda o: _worker(o).update(minReplicas="four"), "minReplicas: 'four' is not of type 'integer'"),
    "string for container port": (lambda o: _head(o)["ports"][0].update(containerPort="6379"), "containerPort: '6379' is not of type 'integer'"),
    "missing containers": (lambda o: _worker(o)["template"]["spec"].pop("containers"), "'containers' is a required property"),
    "empty containers": (lambda o: _worker(o)["template"]["spec"].update(containers=[]), "Required value: at least one container"),
    "GPU quantity 'one'": (
        lambda o: _worker(o)["template"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "one"}),
        "nvidia.com/gpu: Invalid value: 'one': not a Kubernetes quantity",
    ),
    "GPU quantity 0.5": (
        lambda o: [_worker(o)["template"]["spec"]["containers"][0]["resources"][k].update({"nvidia.com/gpu": "500m"}) for k in ("limits", "requests")],
        "Invalid value: '500m': must be an integer",
    ),
    "GPU request above limit": (
        lambda o: _worker(o)["template"]["spec"]["containers"][0]["resources"]["requests"].update({"nvidia.com/gpu": "16"}),
        "must equal the limit '8'",
    ),
    "duplicate container port": (
        lambda o: _head(o)["ports"].append({"containerPort": 8265, "name": "dash2"}),
        "Duplicate value: {containerPort: 8265, protocol: 'TCP'}",
    ),
    "duplicate port name": (lambda o: _head(o)["ports"].append({"containerPort": 9999, "name": "grpc"}), "Duplicate value: 'grpc'"),
    "duplicate container name": (
        lambda o: _worker(o)["template"]["spec"]["containers"].append(copy.deepcopy(_worker(o)["template"]["spec"]["containers"][0])),
        "Duplicate value: {name: 'ray-worker'}",
    ),
    "not a DNS-1123 name": (lambda o: o["metadata"].update(name="Expert_Mesh"), "metadata.name: Invalid value: 'Expert_Mesh'"),
    "name too long for KubeRay": (lambda o: o["metadata"].update(name="e" * 48), "at most 47 characters"),
    "CEL rule": (lambda o: o["spec"].update(managedBy="me"), "the managedBy field value must be either"),
    "unknown ray.io kind": (lambda o: o.update(kind="RayServe"), 'no kind "RayServe" is registered'),
    "unknown ray.io version": (lambda o: o.update(apiVersion="ray.io/v2"), 'no version "v2" of RayService'),
    "min above max replicas": (lambda o: _worker(o).update(minReplicas=5, replicas=5), "minReplicas 5 is greater than maxReplicas 4"),
    "bad upgrade strategy": (lambda o: o["spec"]["upgradeStrategy"].update(type="Recreate"), "'Recreate' is not one of"),
    "serveConfigV2 typo": (
        lambda o: o["spec"].update(serveConfigV2=o["spec"]["serveConfigV2"].replace("import_path:", "import_pth:")),
        'unknown field "import_pth" in Ray Serve config',
    ),
    "serveConfigV2 wrong type": (
        lambda o: o["spec"].update(serveConfigV2=o["spec"]["serveConfigV2"].replace("num_replicas: 1", "num_replicas: many")),
        "Ray Serve:",
    ),
    "expertmesh config typo": (lambda o: _set_serve_arg(o, "parallel", "ep_sise", 4), "args.config.parallel.ep_sise: unknown key"),
    "expertmesh ep_size vs experts": (lambda o: _set_serve_arg(o, "parallel", "ep_size", 24), "does not divide the model's 256 routed experts"),
    "router port not on head": (lambda o: _set_serve_arg(o, "router", "grpc_port", 50052), "50052 is not a containerPort of the head pod"),
    "router on loopback": (lambda o: _set_serve_arg(o, "router", "host", "127.0.0.1"), "unreachable from the Service"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutated_copies_are_rejected(name: str, r1_docs: list[dict[str, Any]], crds: kv.CRDSchemas) -> None:
    mutate, expected = MUTATIONS[name]
    obj = _rayservice(r1_docs)
    assert not kv.validate_object(obj, crds=crds)
    mutate(obj)
    problems = [str(p) for p in kv.validate_object(obj, crds=crds)]
    assert any(expected in p for p in problems), f"{name}: expected {expected!r} in {problems}"


def test_defaults_are_applied_before_validation(crds: kv.CRDSchemas, r1_docs: list[dict[str, Any]]) -> None:
    obj = _rayservice(r1_docs)
    for key in ("minReplicas", "maxReplicas", "replicas"):
        _worker(obj).pop(key)  # required, but with CRD defaults 0 / 2147483647 / 0
    assert not kv.validate_object(obj, crds=crds)
    # the defaulted protocol (TCP) makes an explicit TCP port a duplicate of an implicit one
    _head(obj)["ports"].append({"containerPort": 6379, "protocol": "TCP", "name": "gcs2"})
    assert any("Duplicate value" in str(p) for p in kv.validate_object(obj, crds=crds))


def test_router_service_is_checked_strictly(crds: kv.CRDSchemas, r1_docs: list[dict[str, Any]]) -> None:
    svc = copy.deepcopy(next(d for d in r1_docs if d["kind"] == "Service"))
    assert not kv.validate_object(svc, crds=crds)
    assert svc["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    svc["spec"]["ports"].append(dict(svc["spec"]["ports"][0], name="grpc2"))
    svc["spec"]["selectr"] = {}
    problems = [str(p) for p in kv.validate_object(svc, crds=crds)]
    assert any("Duplicate value" in p for p in problems) and any('unknown field "selectr"' in p for p in problems)


def test_cel_rules_of_rayjob_are_evaluated(crds: kv.CRDSchemas) -> None:
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "job"},
        "spec": {"entrypoint": "python x.py", "deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}}},
    }
    problems = [str(p) for p in kv.validate_object(job, crds=crds)]
    assert any("requires either BOTH onSuccess and onFailure" in p for p in problems), problems


def test_other_kinds_are_not_silently_accepted(crds: kv.CRDSchemas) -> None:
    problems = kv.validate_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, crds=crds)
    assert problems and "no schema" in str(problems[0])


# ---------------------------------------------------------------- command line


def test_cli_render_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.yaml"
    assert manifests_main(["render", str(CONFIGS / "demo.yaml"), "--overlay", "tiny-cpu", "-o", str(out)]) == 0
    assert comparable(list(yaml.safe_load_all(out.read_text()))) == comparable(
        render_documents(load_config(CONFIGS / "demo.yaml"), "tiny-cpu")
    )
    assert manifests_main(["validate", str(out), str(MANIFESTS / "base")]) == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text(out.read_text().replace("minReplicas: 1", "minReplicas: one"))
    assert manifests_main(["validate", str(broken)]) == 1
    assert "INVALID" in capsys.readouterr().out
    assert manifests_main(["render", str(CONFIGS / "demo.yaml"), "--serve-config"]) == 0
    serve = yaml.safe_load(capsys.readouterr().out)
    assert serve["applications"][0]["args"]["config"]["parallel"]["ep_size"] == 2


def test_duplicate_field_is_refused(crds: kv.CRDSchemas) -> None:
    text = (MANIFESTS / "base" / "router-service.yaml").read_text().replace("  type: ClusterIP\n", "  type: ClusterIP\n  type: NodePort\n")
    problems = [str(p) for p in kv.validate_yaml(text, crds=crds)]
    assert any('duplicate field "type"' in p for p in problems), problems


def test_cli_render_refuses_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "demo.yaml").read_text().replace("ep_size: 2", "ep_size: 5"))
    assert manifests_main(["render", str(bad)]) == 2
    assert "parallel.ep_size" in capsys.readouterr().err


# ---------------------------------------------------------------- the images the manifests name


def test_dockerfile_builds_the_images_the_manifests_use() -> None:
    import re

    import ray

    from expertmesh.cluster.kube import manifests

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-cpu AS cpu$", dockerfile, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-cu128 AS cuda$", dockerfile, re.M)
    assert f"ARG RAY_VERSION={manifests.RAY_VERSION}" in dockerfile and ray.__version__ == manifests.RAY_VERSION
    for ref in re.findall(r"(requirements/[\w.-]+\.txt)", dockerfile):
        assert (REPO / ref).is_file(), ref
    # the CPU image bakes the demo's checkpoint where the CPU profiles point the config
    demo = load_config(CONFIGS / "demo.yaml")
    gen = demo.model.generate_if_missing
    assert gen is not None and not gen.fp8
    baked = f"expertmesh make-checkpoint {PROFILES['base'].model_dir}/{demo.model.checkpoint.name} --preset {gen.preset} --seed {gen.seed}"
    assert baked in dockerfile
    images = {p.image for p in PROFILES.values()}
    assert images == {manifests.CPU_IMAGE, manifests.CUDA_IMAGE}
    for folder in RENDERED_AS:
        for doc in yaml.safe_load_all(kustomize(MANIFESTS / folder)):
            for image in re.findall(r"image: (\S+)", yaml.safe_dump(doc)):
                assert image in images, (folder, image)


def test_schema_extensions_on_a_small_schema() -> None:
    """set/map list types, int-or-string, preserve-unknown-fields and defaults, on a toy schema."""
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            "ports": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["port", "protocol"],
                "items": {"type": "object", "required": ["port"], "properties": {
                    "port": {"type": "integer"}, "protocol": {"type": "string", "default": "TCP"},
                    "target": {"x-kubernetes-int-or-string": True},
                }},
            },
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        },
    }
    obj = kv.apply_defaults(schema, {"tags": ["a", "b", "a"], "ports": [{"port": 1}, {"port": 1, "protocol": "TCP"}],
                                     "free": {"anything": 1}})
    assert obj["ports"][0]["protocol"] == "TCP"
    errors = kv._list_type_errors(schema, obj)
    assert ("tags[2]", "Duplicate value: 'a'") in errors
    assert any(path == "ports[1]" and "Duplicate value" in msg for path, msg in errors)
    strict = kv.strict_schema(schema)
    assert strict["additionalProperties"] is False and "additionalProperties" not in strict["properties"]["free"]
    assert strict["properties"]["ports"]["items"]["properties"]["target"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert kv._schema_errors("toy", schema, {"ports": [{"port": 1, "target": "http"}, {"port": 2, "target": 80}]}) == []
    assert kv._schema_errors("toy", schema, {"ports": [{"port": 1, "target": [80]}]})
    assert kv._schema_errors("toy", schema, {"typo": 1}) == [("typo", 'unknown field "typo"')]
