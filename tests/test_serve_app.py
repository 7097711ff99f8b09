"""Issue 6: the Serve application autoscales under load, exports metrics and traces."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest

from _serve_env import deploy, small_app_config
from expertmesh.cluster.telemetry.metrics import METRIC_NAMES
from expertmesh.v1 import generate_pb2, generate_pb2_grpc

APP = "em-test"


class OTLPReceiver:
    """A real OTLP/gRPC trace receiver, in process, on loopback."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans = []
        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for rs in request.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            receiver.spans.append((service, span))
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def by_trace(self, trace_id: bytes):
        return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def otlp():
    r = OTLPReceiver()
    yield r
    r.server.stop(0)


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_ckpt, otlp):
    from ray import serve

    cfg = small_app_config(
        APP, tiny_ckpt,
        autoscaling={"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1, "target_ongoing_requests": 2,
                     "target_queue_depth": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 3,
                     "metrics_interval_s": 0.5, "look_back_period_s": 1},
        telemetry={"service_name": "em-test", "otlp_endpoint": f"127.0.0.1:{otlp.port}", "trace_decode_every": 4})
    address = deploy(cfg)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(address) as ch:
                stub = generate_pb2_grpc.GenerationStub(ch)
                if stub.ListModels(generate_pb2.ListModelsRequest(), timeout=2).models:
                    break
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("router never served")
    yield address
    serve.delete(APP)


def replicas_running() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    d = app.deployments["EngineReplica"]
    return sum(v for k, v in d.replica_states.items() if getattr(k, "value", k) == "RUNNING")


def generate(address: str, prompt: list[int], max_tokens: int, metadata=()) -> generate_pb2.GenerateResponse:
    with grpc.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        req = generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(ids=prompt),
                                           sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                                ignore_eos=True))
        last = None
        for last in stub.Generate(req, metadata=list(metadata), timeout=120):
            pass
        return last


def test_request_trace_continues_client_context(app, otlp):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    out = generate(app, [0, 5, 6, 7, 8], 12, metadata=[("traceparent", f"00-{trace_id}-{parent}-01")])
    assert out.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    want = bytes.fromhex(trace_id)
    deadline = time.monotonic() + 20
    expected = {"router.Generate", "route", "stream", "engine.generate", "queue", "prefill", "decode"}
    while time.monotonic() < deadline and not expected <= {s.name for _, s in otlp.by_trace(want)}:
        time.sleep(0.3)
    spans = {s.name: s for _, s in otlp.by_trace(want)}
    assert expected <= set(spans), sorted(spans)
    router = spans["router.Generate"]
    assert router.parent_span_id == bytes.fromhex(parent)  # continues the client's trace
    assert spans["route"].parent_span_id == router.span_id
    assert spans["stream"].parent_span_id == router.span_id
    root = spans["engine.generate"]
    assert root.parent_span_id == router.span_id  # the replica continues the router's span
    for child in ("queue", "prefill", "decode"):
        assert spans[child].parent_span_id == root.span_id
    services = {svc for svc, _ in otlp.by_trace(want)}
    assert services == {"em-test", "em-test-router"}
    ids = {s.span_id for s in spans.values()} | {bytes.fromhex(parent)}
    assert all(s.parent_span_id in ids for s in spans.values())  # one connected tree


def test_load_step_scales_up_serves_and_scales_down(app):
    from ray import serve  # noqa: F401  (status queries)

    from expertmesh.cluster.router.registry import RegistryRef, get_registry

    assert replicas_running() == 1
    failures: list[str] = []
    served = [0]
    stop = threading.Event()
    seen_max = [1]

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                out = generate(app, [0] + [100 + i * 31 + j for j in range(40)], 48)
                assert out.finish_reason == generate_pb2.FINISH_REASON_LENGTH
                served[0] += 1
            except Exception as exc:  # any failed request fails the test
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(10)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    import ray

    new_replica_served_at = None
    while time.monotonic() - t0 < 120:
        seen_max[0] = max(seen_max[0], replicas_running())
        registry = get_registry(RegistryRef(APP))
        _, entries = ray.get(registry.snapshot.remote())
        credential = (("authorization", f"Bearer {ray.get(registry.internal_token.remote())}"),)
        if len(entries) >= 2:
            loads = []
            for e in entries:
                with grpc.insecure_channel(e["address"]) as ch:
                    from expertmesh.v1 import engine_pb2, engine_pb2_grpc

                    loads.append(engine_pb2_grpc.EngineServiceStub(ch).GetLoad(engine_pb2.EngineLoadRequest(), timeout=5,
                                                                               metadata=credential))
            if sum(1 for ld in loads if ld.prompt_tokens_total > 0) >= 2:
                new_replica_served_at = time.monotonic() - t0
                starts = [e["metadata"].get("started_s") for e in entries]
                break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert new_replica_served_at is not None, f"no second replica served (max replicas seen {seen_max[0]})"
    t_end = time.monotonic()
    while time.monotonic() - t_end < 90 and replicas_running() > 1:
        time.sleep(0.5)
    scaled_down_after = time.monotonic() - t_end
    assert replicas_running() == 1, "did not scale back down"
    assert not failures, failures[:3]
    assert served[0] > 10
    print(f"\nreplica start-up times (s): {starts}")
    print(f"\nscale-up: new replica serving {new_replica_served_at:.1f}s after load start; "
          f"scale-down {scaled_down_after:.1f}s after load end; {served[0]} requests, 0 failed")


def _scrape_all() -> str:
    import ray

    texts = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node["Alive"] and port:
            try:
                texts.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
            except OSError:
                pass
    return "\n".join(texts)


def test_prometheus_metrics_after_traffic(app, tmp_path):
    prompt = [0] + list(range(300, 340))
    generate(app, prompt, 6)
    generate(app, prompt, 6)  # a prefix-cache hit
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = _scrape_all()
        if all(f"ray_{name}" in text for name in METRIC_NAMES):
            break
        time.sleep(1)
    missing = [n for n in METRIC_NAMES if f"ray_{n}" not in text]
    assert not missing, missing

    def value(prefix: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(prefix) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    assert value("ray_expertmesh_requests_total{") >= 1
    assert value("ray_expertmesh_generation_tokens_total{") >= 6
    assert value("ray_expertmesh_time_to_first_token_seconds_count{") >= 1
    assert value("ray_expertmesh_expert_tokens_total{") > 0
    assert 0.0 <= value("ray_expertmesh_kv_usage_ratio{") <= 3.0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/install-test-tools.sh installs Debian's prometheus)")
    ours = _families(_one_node_with_ours(), "ray_expertmesh_")
    result = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, text=True)
    # exit 1 = unparsable; 3 = lint problems. Ray adds camelCase labels (SessionName, NodeAddress,
    # ...) to every series it exports; any other problem is ours and fails the test.
    assert result.returncode in (0, 3), result.stderr
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    ours_only = [p for p in problems if "label names should be written in 'snake_case'" not in p]
    assert not ours_only, ours_only


def _families(exposition: str, prefix: str) -> str:
    """The metric families whose names start with `prefix`, HELP/TYPE lines included."""
    keep, out = False, []
    for line in exposition.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keep = line.split()[2].startswith(prefix)
        elif not line.startswith("#"):
            keep = line.startswith(prefix)
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


def _one_node_with_ours() -> str:
    import ray

    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node["Alive"] and port:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            if "ray_expertmesh_requests_total" in body:
                return body
    raise AssertionError("no node exports expertmesh metrics")
