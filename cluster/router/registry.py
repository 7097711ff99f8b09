"""How the router discovers engine replicas.

On Ray, every engine replica registers its EngineService address with a small named actor when
it starts serving, heart-beats every HEARTBEAT_S, and deregisters when Serve begins to drain it;
the router polls the registry's version and re-syncs its replica set on change. Each application
has a registry of its own (named after the app, in the app's Ray namespace), so two apps on one
cluster never see each other's replicas and one app's `down` leaves the other's alone. A replica
that dies without deregistering (kill -9) stops heart-beating and is dropped after TTL_S.
A static list of addresses serves tests and development without Ray.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from expertmesh.cluster.router.replicas import ReplicaEndpoint, ReplicaSet, cancel_task

log = logging.getLogger(__name__)

REGISTRY_PREFIX = "ReplicaRegistry"
DEFAULT_APP = "expertmesh"
DEFAULT_NAMESPACE = "expertmesh"
HEARTBEAT_S = 2.0
TTL_S = 6.0  # three missed heartbeats


@dataclass(frozen=True)
class RegistryRef:
    """Which registry: the one of application `app` in Ray namespace `namespace`."""

    app: str = DEFAULT_APP
    namespace: str = DEFAULT_NAMESPACE

    @property
    def actor_name(self) -> str:
        return f"{REGISTRY_PREFIX}:{self.app}"


@dataclass
class RegistryEntry:
    replica_id: str
    address: str
    metadata: dict[str, str] = field(default_factory=dict)
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


class ReplicaRegistry:
    """Replica id → address. A plain class so tests drive it without Ray; on Ray it runs as the
    named actor made by `get_or_create_registry`. `version` changes on every membership change so
    pollers can skip unchanged snapshots."""

    def __init__(self, ttl_s: float | None = None) -> None:
        self.ttl_s = ttl_s
        self.version = 0
        self._entries: dict[str, RegistryEntry] = {}
        # The app's internal credential: its replicas accept EngineService calls only with it, and
        # its router sends it. Made here, once per app, kept in the cluster (never in a snapshot).
        self._internal_token = secrets.token_hex(32)

    def internal_token(self) -> str:
        return self._internal_token

    def register(self, replica_id: str, address: str, metadata: dict[str, str] | None = None) -> int:
        current = self._entries.get(replica_id)
        if current is not None and current.address == address:
            current.last_seen = time.time()
            current.metadata = dict(metadata or current.metadata)
            return self.version
        self._entries[replica_id] = RegistryEntry(replica_id, address, dict(metadata or {}))
        self.version += 1
        log.info("registered replica %s at %s (version %d)", replica_id, address, self.version)
        return self.version

    def heartbeat(self, replica_id: str, metadata: dict[str, str] | None = None) -> bool:
        """Refreshes the entry (and its metadata, when given); False when the registry forgot it."""
        entry = self._entries.get(replica_id)
        if entry is not None:
            entry.last_seen = time.time()
            if metadata is not None:
                entry.metadata = dict(metadata)
        return entry is not None

    def deregister(self, replica_id: str) -> int:
        if self._entries.pop(replica_id, None) is not None:
            self.version += 1
            log.info("deregistered replica %s (version %d)", replica_id, self.version)
        return self.version

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        self._expire()
        return self.version, [asdict(e) for e in self._entries.values()]

    def _expire(self) -> None:
        if self.ttl_s is None:
            return
        now = time.time()
        for rid, entry in list(self._entries.items()):
            if now - entry.last_seen > self.ttl_s:
                log.warning("replica %s missed heartbeats for %.0f s; dropped", rid, now - entry.last_seen)
                self.deregister(rid)


def get_or_create_registry(ref: RegistryRef = RegistryRef(), ttl_s: float | None = TTL_S, detached: bool = True):
    """The application's registry actor (created on first use; detached, so it outlives whichever
    of router and replica made it). Needs `ray.init` done. It restarts if it dies; replicas then
    re-register on their next heartbeat (see RegistryClient)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ReplicaRegistry)
    # scheduling_strategy DEFAULT: never inside the caller's placement group. Serve replicas capture
    # their children into theirs, so a registry first made by an EngineReplica died with that
    # replica's group when the replica was killed, and (max_restarts -1, no group left) every
    # router poll and replacement replica then waited on it: the killed replica never left GetLoad.
    options: dict[str, Any] = dict(name=ref.actor_name, namespace=ref.namespace, get_if_exists=True,
                                   scheduling_strategy="DEFAULT")
    if detached:
        options["lifetime"] = "detached"
    return actor_cls.options(**options).remote(ttl_s)


def get_registry(ref: RegistryRef = RegistryRef()):
    """The application's existing registry actor; raises ValueError when none runs."""
    import ray

    return ray.get_actor(ref.actor_name, namespace=ref.namespace)


class RegistryClient:
    """The replica side: registers this replica's EngineService address, heart-beats (re-registering
    if the registry restarted and forgot it), and deregisters when the replica starts draining."""

    def __init__(self, replica_id: str, address: str, metadata: dict[str, str] | None = None,
                 heartbeat_s: float = HEARTBEAT_S, handle: Any = None, ref: RegistryRef = RegistryRef()) -> None:
        self.replica_id, self.address, self.metadata = replica_id, address, dict(metadata or {})
        self.heartbeat_s = heartbeat_s
        self._handle, self._ref = handle, ref
        self._task: asyncio.Task | None = None

    @property
    def handle(self) -> Any:
        if self._handle is None:
            self._handle = get_or_create_registry(self._ref)
        return self._handle

    async def register(self) -> None:
        await self.handle.register.remote(self.replica_id, self.address, self.metadata)

    async def internal_token(self) -> str:
        """The credential this replica's EngineService must require (its app's, from the registry)."""
        return await self.handle.internal_token.remote()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not await self.handle.heartbeat.remote(self.replica_id, dict(self.metadata)):
                    log.warning("registry forgot replica %s; registering again", self.replica_id)
                    await self.register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the registry may be restarting
                log.warning("registry heartbeat of %s failed: %r", self.replica_id, exc)

    async def start(self) -> None:
        await self.register()
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self, deregister: bool = True) -> None:
        await cancel_task(self._task)
        self._task = None
        if deregister:
            await self.handle.deregister.remote(self.replica_id)


class ReplicaSource(Protocol):
    async def snapshot(self) -> tuple[int, list[ReplicaEndpoint]]:
        """(version, endpoints); the version changes whenever the membership does."""
        ...


def parse_static(spec: str) -> ReplicaEndpoint:
    """"host:port" or "id=host:port"."""
    rid, sep, address = spec.partition("=")
    if not sep:
        rid, address = spec, spec
    if ":" not in address:
        raise ValueError(f"replicas: {spec!r} is not host:port or id=host:port")
    return ReplicaEndpoint(rid.strip(), address.strip())


class StaticReplicaSource:
    """A fixed list (tests, dev); `set()` swaps it, as an autoscaler would."""

    def __init__(self, endpoints: list[ReplicaEndpoint | str]) -> None:
        self.version = 0
        self.endpoints: list[ReplicaEndpoint] = []
        self.set(endpoints)

    def set(self, endpoints: list[ReplicaEndpoint | str]) -> None:
        self.endpoints = [e if isinstance(e, ReplicaEndpoint) else parse_static(e) for e in endpoints]
        self.version += 1

    async def snapshot(self) -> tuple[int, list[ReplicaEndpoint]]:
        return self.version, list(self.endpoints)


class RayRegistrySource:
    """Reads one application's ReplicaRegistry actor."""

    def __init__(self, handle: Any = None, ref: RegistryRef = RegistryRef()) -> None:
        self._handle, self.ref = handle, ref
        self._token: str | None = None

    async def snapshot(self) -> tuple[int, list[ReplicaEndpoint]]:
        if self._handle is None:
            self._handle = get_or_create_registry(self.ref)
        if self._token is None:
            self._token = await self._handle.internal_token.remote()
        version, entries = await self._handle.snapshot.remote()
        return version, [ReplicaEndpoint(e["replica_id"], e["address"], e.get("metadata") or {}, self._token)
                         for e in entries]


class RegistryWatcher:
    """Keeps a ReplicaSet in step with a ReplicaSource by polling it."""

    def __init__(self, source: ReplicaSource, replicas: ReplicaSet, interval_s: float = 1.0) -> None:
        self.source, self.replicas, self.interval_s = source, replicas, interval_s
        self._version: int | None = None
        self._task: asyncio.Task | None = None

    async def poll_once(self) -> None:
        version, endpoints = await self.source.snapshot()
        if version != self._version:
            self._version = version
            self.replicas.sync(endpoints)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the last known set; the registry may restart
                log.warning("replica registry poll failed: %r", exc)

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
