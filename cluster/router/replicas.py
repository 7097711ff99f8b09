"""The set of engine replicas the router can send to.

Replicas join and leave as the registry says (Serve's autoscaler adds and drains them). A replica
that fails a call with UNAVAILABLE or misses a health probe leaves rotation at once and comes back
when a probe succeeds; one that leaves the registry stops receiving requests, and its channel is
closed once its in-flight streams end (Serve drains a replica before it goes).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
from grpc import aio

from expertmesh.cluster.auth import bearer_client_interceptors
from expertmesh.v1 import engine_pb2, engine_pb2_grpc, generate_pb2

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # the router retries itself, on another replica
]


async def cancel_task(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


@dataclass(frozen=True)
class ReplicaEndpoint:
    replica_id: str
    address: str  # host:port of the replica's EngineService
    metadata: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    auth_token: str | None = field(default=None, repr=False, hash=False, compare=False)  # internal credential


class Replica:
    """One engine replica as the router sees it: a channel, its last load report, and state."""

    def __init__(self, endpoint: ReplicaEndpoint) -> None:
        self.endpoint = endpoint
        self.channel = aio.insecure_channel(endpoint.address, options=CHANNEL_OPTIONS,
                                            interceptors=bearer_client_interceptors(endpoint.auth_token))
        self.stub = engine_pb2_grpc.EngineServiceStub(self.channel)
        self.healthy = True  # optimistic: a new replica is probed right away anyway
        self.leaving = False
        self.inflight = 0
        self.load = generate_pb2.ReplicaLoad(replica_id=endpoint.replica_id, address=endpoint.address)
        self.last_ok = 0.0
        self.failures = 0
        self.saturated_since: float | None = None  # when it last refused for a full queue

    @property
    def replica_id(self) -> str:
        return self.endpoint.replica_id

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def load_score(self) -> int:
        """Running+waiting as last reported, but never below what this router has in flight
        (the report lags by up to one probe interval)."""
        return max(self.load.running + self.load.waiting, self.inflight)

    @property
    def kv_total_tokens(self) -> int:
        return int(self.load.kv_total_tokens)

    @property
    def in_rotation(self) -> bool:
        return self.healthy and not self.leaving

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            log.warning("replica %s (%s) out of rotation: %s", self.replica_id, self.address, reason)
        self.healthy = False
        self.failures += 1

    def mark_up(self) -> None:
        if not self.healthy:
            log.info("replica %s (%s) back in rotation", self.replica_id, self.address)
        self.healthy = True
        self.failures = 0
        self.last_ok = time.monotonic()

    def saturated(self, ttl_s: float, now: float) -> bool:
        return self.saturated_since is not None and now - self.saturated_since < ttl_s

    @property
    def capacity(self) -> int:
        """Requests the replica holds before it refuses (running slots + queue), as it reports
        them; 0: unknown or unlimited."""
        load = self.load
        return load.max_running + load.max_waiting if load.max_running and load.max_waiting else 0

    def room(self, ttl_s: float, now: float) -> int | None:
        """Requests this router may still send before the replica refuses; None: no known bound.
        Counts this router's own requests there: other routers' show up as refusals."""
        if self.saturated(ttl_s, now):
            return 0
        cap = self.capacity
        return None if not cap else max(0, cap - self.inflight)

    def snapshot(self) -> generate_pb2.ReplicaLoad:
        out = generate_pb2.ReplicaLoad()
        out.CopyFrom(self.load)
        out.replica_id, out.address, out.healthy = self.replica_id, self.address, self.in_rotation
        return out

    async def close(self) -> None:
        await self.channel.close(grace=None)


class Admission:
    """One request let in at the door, counted in `ReplicaSet.admitting` until it is sent to a
    replica (`placed`) or ends without (`release`); both idempotent."""

    __slots__ = ("_replicas", "_held")

    def __init__(self, replicas: "ReplicaSet") -> None:
        self._replicas = replicas
        self._held = True
        replicas.admitting += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._replicas.admitting -= 1

    placed = release


class ReplicaSet:
    """Replicas by id, kept in step with a registry and probed for health and load."""

    def __init__(self, probe_interval_s: float = 0.5, probe_timeout_s: float = 1.0,
                 on_removed: Callable[[str], None] | None = None,
                 on_change: Callable[["ReplicaSet"], None] | None = None,
                 saturation_ttl_s: float = 1.0) -> None:
        self.replicas: dict[str, Replica] = {}
        self._leaving: dict[str, Replica] = {}
        self.probe_interval_s = probe_interval_s
        # A replica that refused for a full queue counts as full until one of its requests ends,
        # a later probe shows room, or this long has passed (slots freed by other routers).
        self.saturation_ttl_s = saturation_ttl_s
        self.probe_timeout_s = probe_timeout_s
        self._on_removed = on_removed
        self._on_change = on_change
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task] = set()  # the loop keeps only weak references
        # Requests let in at the door (Admission) and not yet sent to a replica: they count
        # against the replicas' room, so a burst cannot all pass the door before the first lands.
        self.admitting = 0

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- membership -------------------------------------------------------------------------
    def sync(self, endpoints: Iterable[ReplicaEndpoint]) -> None:
        """Make the set equal to `endpoints`: add new ones, start draining missing ones."""
        wanted = {e.replica_id: e for e in endpoints}
        for rid, ep in wanted.items():
            current = self.replicas.get(rid)
            if current is not None and current.address == ep.address:
                continue
            if current is not None:  # same id, new address: treat as leave + join
                self._retire(current)
            log.info("replica %s joined at %s", rid, ep.address)
            replica = self.replicas[rid] = Replica(ep)
            if self._task is not None:
                self._spawn(self._probe(replica))
        for rid in list(self.replicas):
            if rid not in wanted:
                log.info("replica %s left", rid)
                self._retire(self.replicas[rid])
        self._notify()

    def _retire(self, replica: Replica) -> None:
        self.replicas.pop(replica.replica_id, None)
        replica.leaving = True
        if self._on_removed:
            self._on_removed(replica.replica_id)
        self._leaving[f"{replica.replica_id}@{replica.address}"] = replica
        self._close_idle_leavers()

    def _close_idle_leavers(self) -> None:
        for key, replica in list(self._leaving.items()):
            if replica.inflight == 0:
                del self._leaving[key]
                try:
                    self._spawn(replica.close())
                except RuntimeError:  # no loop: nothing to close on
                    pass

    def _notify(self) -> None:
        self._changed.set()
        if self._on_change:
            self._on_change(self)

    def available(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.in_rotation]

    def get(self, replica_id: str) -> Replica | None:
        return self.replicas.get(replica_id)

    def request_started(self, replica: Replica) -> None:
        replica.inflight += 1

    def request_ended(self, replica: Replica, freed: bool = True) -> None:
        """`freed`: the replica had taken the request, so its end frees a slot there."""
        replica.inflight -= 1
        if freed:
            replica.saturated_since = None
        if replica.leaving:
            self._close_idle_leavers()

    def report_saturated(self, replica: Replica) -> None:
        replica.saturated_since = time.monotonic()

    def saturated(self) -> bool:
        """No replica in rotation has room: each refused for a full queue lately (and has freed no
        slot since) or holds its reported capacity of this router's requests, counting those let
        in at the door and not yet sent. A new request can be refused here at once, without
        asking a replica (whose refusal waits for its busy event loop)."""
        now = time.monotonic()
        room = 0
        replicas = [r for r in self.replicas.values() if r.in_rotation]
        for r in replicas:
            free = r.room(self.saturation_ttl_s, now)
            if free is None:
                return False
            room += free
        return bool(replicas) and room <= self.admitting

    def with_room(self, replicas: list[Replica]) -> list[Replica]:
        """Those of `replicas` not known to be full (all of them when none has room)."""
        now = time.monotonic()
        roomy = [r for r in replicas if r.room(self.saturation_ttl_s, now) != 0]
        return roomy or replicas

    def admit(self) -> "Admission":
        """Let one request in at the door (the caller checked `saturated()`)."""
        return Admission(self)

    def report_unavailable(self, replica: Replica, reason: str) -> None:
        replica.mark_down(reason)
        self._notify()

    async def wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # ---- probing ----------------------------------------------------------------------------
    async def _probe(self, replica: Replica) -> None:
        asked = time.monotonic()
        try:
            load = await replica.stub.GetLoad(engine_pb2.EngineLoadRequest(), timeout=self.probe_timeout_s)
        except (grpc.RpcError, asyncio.TimeoutError) as exc:
            code = exc.code() if isinstance(exc, aio.AioRpcError) else None
            was_up = replica.healthy
            replica.mark_down(f"probe failed: {code or exc!r}")
            if was_up:
                self._notify()
            return
        except asyncio.CancelledError:
            raise
        replica.load = load
        since = replica.saturated_since
        if since is not None and since < asked and load.max_waiting and load.waiting < load.max_waiting:
            replica.saturated_since = None  # its queue has room again (another router's requests ended)
        was_up = replica.healthy
        if load.healthy:
            replica.mark_up()
        else:
            replica.mark_down("replica reports it is draining")
        if was_up != replica.healthy:
            self._notify()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in list(self.replicas.values())))

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a probe bug must not stop probing
                log.exception("replica probe round failed")
            await asyncio.sleep(self.probe_interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        for replica in list(self.replicas.values()) + list(self._leaving.values()):
            await replica.close()
        self.replicas.clear()
        self._leaving.clear()

