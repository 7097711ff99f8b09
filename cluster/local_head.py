"""An embedded single-node Ray head on 127.0.0.1 that outlives the command that started it.

`expertmesh up` starts one when no cluster address is given. It runs `ray start --head --block` in
a session of its own, so `down` stops exactly this cluster (by process group) and nothing else on
the machine. Ray 2.60 turns token auth on by default and `ray start` refuses to run without a
token, so each head gets a token of its own in expertmesh's state dir, handed to Ray through
RAY_AUTH_TOKEN_PATH: the head, the drivers of `status`/`down` and the `ray` CLI (with the
environment `status` prints) all read the same file, and nothing in ~/.ray is needed or touched.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from expertmesh.cluster.ray_cluster import LOCAL_ENV, forget_address_file

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalHead:
    address: str  # 127.0.0.1:PORT (GCS)
    pid: int  # the `ray start --block` process, leader of its own process group
    token_path: Path
    dashboard_url: str | None
    log_path: Path

    def env(self) -> dict[str, str]:
        """What a driver or `ray` CLI call needs to talk to this head."""
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), **LOCAL_ENV}
        if self.dashboard_url:
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        return env


def write_token(path: Path) -> Path:
    """A fresh 256-bit token (the length Ray generates), readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def start_local_head(state_dir: Path, name: str, num_cpus: int | None = None, dashboard_port: int | None = 8265,
                     timeout_s: float = 120.0) -> LocalHead:
    """Starts the head and waits until its GCS (and dashboard, when on) accept connections.
    dashboard_port None turns the dashboard off; 0 picks a free port."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    token_path = write_token(state_dir / f"{name}.ray-token")
    env = {**os.environ, **LOCAL_ENV, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of this cluster's token
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
           f"--num-cpus={num_cpus or os.cpu_count() or 2}"]
    dashboard_url = None
    if dashboard_port is None:
        cmd.append("--include-dashboard=false")
    else:
        dashboard_port = dashboard_port or free_port()
        if _port_open(dashboard_port):
            raise RuntimeError(f"ray.dashboard_port {dashboard_port} is already in use on 127.0.0.1: "
                               "set another port in the config (ray.dashboard_port) or stop what holds it")
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"ray-{port}.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(f"127.0.0.1:{port}", proc.pid, token_path, dashboard_url, log_path)
    want = [port] + ([dashboard_port] if dashboard_port else [])
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            token_path.unlink(missing_ok=True)
            raise RuntimeError(f"`ray start` exited with {proc.returncode} (log {log_path}):\n{tail}")
        if all(_port_open(p) for p in want):
            break
        time.sleep(0.3)
    else:
        stop_local_head(head)
        raise TimeoutError(f"the local Ray head did not come up in {timeout_s:.0f} s; see {log_path}")
    log.info("started a local Ray head on %s in %.1fs (pid %d, dashboard %s)", head.address,
             time.monotonic() - t0, proc.pid, dashboard_url or "off")
    return head


def stop_local_head(head: LocalHead | None = None, *, pid: int | None = None, address: str | None = None,
                    token_path: Path | str | None = None, grace_s: float = 5.0) -> None:
    """Stops the head's process group and removes what pointed at it: its token and Ray's
    `ray_current_cluster` file (which would make the next plain `ray.init()` join a dead address).
    Workers die with their raylet at once; the GCS and the autoscaler monitor ignore SIGTERM for
    ~30 s, so after `grace_s` the group gets SIGKILL (the cluster keeps no state worth flushing)."""
    if head is not None:
        pid, address, token_path = head.pid, head.address, head.token_path
    if pid is not None:
        _kill_group(pid, grace_s)
    if address:
        forget_address_file(address)
    if token_path:
        Path(token_path).unlink(missing_ok=True)


def _kill_group(pid: int, grace_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
