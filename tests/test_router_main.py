"""`expertmesh router` as its own process, and the deployment YAML's router section mapping."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _router_env import LoopThread, start_replica
from expertmesh.cluster.router.client import GenerationClient
from expertmesh.cluster.router.config import RouterConfig
from expertmesh.cluster.devtools.synthetic import SyntheticEngine

REPO = Path(__file__).resolve().parents[1]


def test_router_process_serves_and_stops_on_sigterm(tiny_ckpt):
    lt = LoopThread()
    replica = start_replica(lt, SyntheticEngine(tiny_ckpt), tiny_ckpt, replica_id="r0")
    code = "import sys; from expertmesh.cluster.router.main import router_main; sys.exit(router_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--policy", "round_robin",
                             "--replica", f"r0={replica.address}", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("expertmesh router: gRPC on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        address = line.split("gRPC on ")[1].split(",")[0].strip()
        with GenerationClient(address, timeout=20) as c:
            assert len(c.complete("hi", max_tokens=4).token_ids) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        lt.run(replica.stop(0))
        lt.close()


def test_router_config_from_deploy_yaml(monkeypatch):
    from expertmesh.cluster.config import load_config

    section = load_config(REPO / "configs" / "demo.yaml").router
    cfg = RouterConfig.from_deploy_section(section, replicas=["127.0.0.1:1"])
    assert (cfg.host, cfg.grpc_port, cfg.http_port, cfg.policy) == ("127.0.0.1", 50051, 8000, "cache_aware")
    assert cfg.cache_aware.cache_threshold == section.cache_threshold and cfg.auth_token is None
    prod = load_config(REPO / "configs" / "deepseek-r1-a100.yaml").router
    monkeypatch.delenv("EXPERTMESH_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="EXPERTMESH_API_TOKEN"):
        RouterConfig.from_deploy_section(prod)
    monkeypatch.setenv("EXPERTMESH_API_TOKEN", "t0k")
    assert RouterConfig.from_deploy_section(prod).auth_token == "t0k"
