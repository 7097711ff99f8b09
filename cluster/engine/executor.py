"""Executors run one step on every rank of the engine's group and collect the results.

`LocalExecutor`: one in-process ModelWorker (ep_size 1; no Ray). `RayGroupExecutor`: one
RankActor per rank, gang-scheduled in a placement group, joined in a torch.distributed group;
one Ray call per rank per step, awaited together. A rank that raises or dies fails the step with
an error naming it; `rebuild()` then replaces that rank's actor in place and re-forms the group
with the survivors, who keep their weights and KV.
"""
from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from expertmesh.actors.rank_actor import RankActor
from expertmesh.actors.step import StepInput, StepOutput
from expertmesh.actors.worker import ModelWorker, WorkerSpec
from expertmesh.cluster.ray_cluster import is_local_address

log = logging.getLogger(__name__)


class GroupFailure(RuntimeError):
    """A step failed on one or more ranks; the group must be rebuilt before it serves again."""


class Executor(Protocol):
    ep_size: int

    def step(self, inputs: list[StepInput]) -> list[StepOutput]: ...
    def expert_load(self, window_s: float | None = None) -> list[list[list[int]]]: ...
    def describe(self) -> list[dict]: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    def __init__(self, spec: WorkerSpec):
        if spec.ep_size != 1:
            raise ValueError("LocalExecutor runs ep_size 1; use RayGroupExecutor for expert parallelism")
        self.ep_size = 1
        self.worker = ModelWorker(spec)
        self.info = [{"rank": 0, "expert_range": list(self.worker.expert_range),
                      "routed_expert_params": self.worker.routed_expert_param_count(),
                      "weight_bytes": self.worker.model.weight_bytes(), "node": "local",
                      "decode_graphs": self.worker.decode_graphs_status}]

    def step(self, inputs: list[StepInput]) -> list[StepOutput]:
        return [self.worker.step(inputs[0])]

    def expert_load(self, window_s: float | None = None) -> list[list[list[int]]]:
        return [self.worker.expert_load(window_s).tolist()]

    def describe(self) -> list[dict]:
        return self.info

    def shutdown(self) -> None:
        pass


@dataclass
class PlacementSpec:
    """How a group's ranks are placed: one bundle per rank."""

    strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    custom_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"A100": 1}
    # use an existing placement group (a Serve replica's) from this bundle index on
    placement_group: object | None = None
    first_bundle: int = 0

    def bundle(self) -> dict[str, float]:
        b: dict[str, float] = {"CPU": self.cpus_per_rank}
        if self.gpus_per_rank:
            b["GPU"] = self.gpus_per_rank
        b.update(self.custom_resources)
        return b


class RayGroupExecutor:
    def __init__(self, spec: WorkerSpec, placement: PlacementSpec, group_name: str | None = None,
                 namespace: str = "expertmesh", collective_timeout_s: float = 60.0, step_timeout_s: float = 600.0):
        import ray
        from ray.util.placement_group import placement_group

        self.ep_size = spec.ep_size
        self.group_name = group_name or f"group-{uuid.uuid4().hex[:8]}"
        self.step_timeout_s = step_timeout_s
        self._own_pg = placement.placement_group is None
        if self._own_pg:
            self.pg = placement_group([placement.bundle()] * spec.ep_size, strategy=placement.strategy,
                                      name=f"expertmesh/{self.group_name}")
            t0 = time.monotonic()
            ray.get(self.pg.ready(), timeout=600)
            log.info("placement group for %s ready in %.1fs", self.group_name, time.monotonic() - t0)
        else:
            self.pg = placement.placement_group
        self.spec, self.placement, self.namespace = spec, placement, namespace
        self.collective_timeout_s = collective_timeout_s
        self._local = placement.gpus_per_rank == 0 and _is_local()
        self.generation = [0] * spec.ep_size  # how often each rank was replaced (names its actor)
        self.failed: str | None = None
        self._step_failures: tuple[list[int], list[int]] = ([], [])  # (died, raised) in the last failed step
        self.rebuilding = False
        self.rebuilds: list[dict] = []  # one record per in-place rebuild: ranks replaced, seconds
        self.info: list[dict] = []
        self.actors = [self._make_actor(rank) for rank in range(spec.ep_size)]
        self.info = self._join([(a, "setup") for a in self.actors])
        log.info("expert-parallel group %s: %d ranks on nodes %s", self.group_name, self.ep_size,
                 sorted({i["node_id"] for i in self.info}))

    def _actor_name(self, rank: int) -> str:
        g = self.generation[rank]
        return f"expertmesh/{self.group_name}/rank-{rank}" + (f".{g}" if g else "")

    def _make_actor(self, rank: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p = self.placement
        opts = dict(
            name=self._actor_name(rank), namespace=self.namespace, num_cpus=p.cpus_per_rank,
            num_gpus=p.gpus_per_rank, resources=p.custom_resources or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=p.first_bundle + rank),
            runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}} if self._local else None,
        )
        return ray.remote(RankActor).options(**opts).remote(WorkerSpec(**{**self.spec.__dict__, "ep_rank": rank}))

    def _join(self, calls: list[tuple[object, str]]) -> list[dict]:
        """Every rank joins a new process group: `setup` (a new actor, which loads its weights
        too) or `regroup` (a survivor). Returns the ranks' info in rank order."""
        import ray

        init_method = self._init_method()
        try:
            info = ray.get([getattr(a, m).remote(init_method, self.collective_timeout_s) for a, m in calls],
                           timeout=600)
        finally:  # the rendezvous is over (gloo and NCCL connect their pairs at init): drop its file
            if init_method.startswith("file://"):
                Path(init_method.removeprefix("file://")).unlink(missing_ok=True)
        nodes = ray.get([a.node_address.remote() for a in self.actors])
        node_ids = ray.get([a.node_id.remote() for a in self.actors])
        old = {i["rank"]: i for i in self.info}
        return [{**old.get(rank, {}), **i, "node": n, "node_id": nid, "actor_name": self._actor_name(rank)}
                for rank, (i, n, nid) in enumerate(zip(info, nodes, node_ids))]

    def rebuild(self, attempts: int = 3) -> list[int]:
        """Re-form the group in place after a failed step: replace the dead (or failing) rank
        actors; the survivors rejoin with their weights and KV. Returns the replaced ranks.
        Raises GroupFailure if it cannot (the replica then fails as a unit, as before)."""
        t0 = time.monotonic()
        self.rebuilding = True
        replaced: set[int] = set()
        try:
            for attempt in range(1, attempts + 1):
                dead = self._dead_ranks()
                detect_s = time.monotonic() - t0
                for rank in dead:
                    self.generation[rank] += 1
                    self.actors[rank] = self._make_actor(rank)
                replaced |= set(dead)
                try:
                    self.info = self._join([(a, "setup" if r in dead else "regroup")
                                            for r, a in enumerate(self.actors)])
                    break
                except Exception as exc:  # noqa: BLE001 - another rank died meanwhile: go again
                    log.error("group %s: rebuild attempt %d failed: %s", self.group_name, attempt, _rank_error(exc))
                    # a rank whose join was cut short is not reusable (torch.distributed keeps
                    # per-process group state): the next attempt starts every rank afresh
                    self._step_failures = (list(range(self.ep_size)), [])
                    if attempt == attempts:
                        raise GroupFailure(f"group {self.group_name}: rebuild failed: {_rank_error(exc)}") from exc
            seconds = time.monotonic() - t0
            self.rebuilds.append({"ranks": sorted(replaced), "seconds": round(seconds, 2), "attempts": attempt,
                                  "detect_s": round(detect_s, 2), "cause": self.failed})
            log.warning("group %s rebuilt in place in %.1fs: replaced rank(s) %s", self.group_name, seconds,
                        sorted(replaced))
            self.failed = None
            return sorted(replaced)
        finally:
            self.rebuilding = False

    def _dead_ranks(self) -> list[int]:
        """The ranks to replace: those whose actor died in the step; if none died, those that
        raised (their state after a partial step is not trusted; killing them also breaks the
        others out of the collective they wait in). Every other rank must then answer a ping; one
        that does not (within the collective timeout) is replaced too."""
        import ray

        died, raised = self._step_failures
        self._step_failures = ([], [])
        replace = sorted(died) if died else sorted(raised)
        for rank in replace:
            try:
                ray.kill(self.actors[rank], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        refs = {r: self.actors[r].ping.remote() for r in range(self.ep_size) if r not in replace}
        for rank, ref in refs.items():
            try:
                ray.get(ref, timeout=self.collective_timeout_s + 5)
            except Exception:  # noqa: BLE001 - ActorDiedError, GetTimeoutError, ...
                replace.append(rank)
                try:
                    ray.kill(self.actors[rank], no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
        return sorted(replace)

    def _init_method(self) -> str:
        """Rendezvous of the group: a file when every rank is on this machine's loopback (nothing
        listens), else rank 0's TCPStore on its node address."""
        import ray

        nodes = set(ray.get([a.node_address.remote() for a in self.actors]))
        if all(is_local_address(n) for n in nodes):
            return f"file://{tempfile.gettempdir()}/expertmesh-pg-{self.group_name.replace('/', '-')}-{uuid.uuid4().hex}"
        master = ray.get(self.actors[0].node_address.remote())
        port = ray.get(self.actors[0].free_port.remote())
        return f"tcp://{master}:{port}"

    def step(self, inputs: list[StepInput]) -> list[StepOutput]:
        import ray

        if self.failed:
            raise GroupFailure(f"group {self.group_name} is down: {self.failed}")
        refs = [a.step.remote(inp) for a, inp in zip(self.actors, inputs)]
        pending = list(refs)
        deadline = time.monotonic() + self.step_timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                self.failed = f"step timed out after {self.step_timeout_s}s"
                raise GroupFailure(self.failed)
            try:
                ray.get(done[0])
            except Exception as exc:  # the first failing rank names itself; the rest time out
                self.failed = _rank_error(exc)
                self._step_failures = self._classify(refs, done[0], exc)
                raise GroupFailure(f"group {self.group_name}: {self.failed}") from exc
        return ray.get(refs)

    @staticmethod
    def _classify(refs, first, first_exc, grace_s: float = 1.0) -> tuple[list[int], list[int]]:
        """(ranks whose actor died, ranks that raised) among a failed step's calls, waiting a
        moment for the rest: a death usually reaches the survivors as a connection error too."""
        import ray
        from ray.exceptions import RayActorError

        results = {first: first_exc}
        rest = [r for r in refs if r is not first]
        done, _ = ray.wait(rest, num_returns=len(rest), timeout=grace_s) if rest else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001
                results[ref] = exc
        died = [rank for rank, ref in enumerate(refs) if isinstance(results.get(ref), RayActorError)]
        raised = [rank for rank, ref in enumerate(refs) if results.get(ref) is not None and rank not in died]
        return died, raised

    def inject_fault(self, rank: int, message: str = "injected fault") -> None:
        import ray

        ray.get(self.actors[rank].inject_fault.remote(message))

    def expert_load(self, window_s: float | None = None) -> list[list[list[int]]]:
        """Per rank, [moe layer][expert] tokens routed (since start, or over the last window_s)."""
        import ray

        return ray.get([a.expert_load.remote(window_s) for a in self.actors])

    def describe(self) -> list[dict]:
        return self.info

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._own_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass


def _rank_error(exc: Exception) -> str:
    text = str(exc)
    for line in text.splitlines()[::-1]:
        if "rank " in line and "failed" in line:
            return line.strip().split("RankFailure: ")[-1]
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


def _is_local() -> bool:
    """This node runs on loopback (a local cluster): keep the ranks' gloo traffic there too."""
    import ray

    try:
        return is_local_address(ray.util.get_node_ip_address())
    except Exception:
        return False
