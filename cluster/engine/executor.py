"""Executors run one step on every rank of the engine's group and collect the results.

`LocalExecutor`: one in-process ModelWorker (ep_size 1; no Ray). `RayGroupExecutor`: one
RankActor per rank, gang-scheduled in a placement group, joined in a torch.distributed group;
one Ray call per rank per step, awaited together. A rank that raises fails the step with an
error naming it; the others fall out of their collective after `collective_timeout_s`.
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
                      "routed_expert_params": self.worker.routed_expert_param_count(), "node": "local"}]

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
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
        actor_cls = ray.remote(RankActor)
        self.actors = []
        for rank in range(spec.ep_size):
            rank_spec = WorkerSpec(**{**spec.__dict__, "ep_rank": rank})
            opts = dict(
                name=f"expertmesh/{self.group_name}/rank-{rank}",
                namespace=namespace,
                num_cpus=placement.cpus_per_rank,
                num_gpus=placement.gpus_per_rank,
                resources=placement.custom_resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=placement.first_bundle + rank),
                runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}} if placement.gpus_per_rank == 0 and _is_local() else None,
            )
            self.actors.append(actor_cls.options(**opts).remote(rank_spec))
        init_method = self._init_method()
        try:
            self.info = ray.get([a.setup.remote(init_method, collective_timeout_s) for a in self.actors], timeout=600)
        finally:  # the rendezvous is over (gloo and NCCL connect their pairs at init): drop its file
            if init_method.startswith("file://"):
                Path(init_method.removeprefix("file://")).unlink(missing_ok=True)
        nodes = ray.get([a.node_address.remote() for a in self.actors])
        node_ids = ray.get([a.node_id.remote() for a in self.actors])
        for i, n, nid in zip(self.info, nodes, node_ids):
            i["node"], i["node_id"] = n, nid
            i["actor_name"] = f"expertmesh/{self.group_name}/rank-{i['rank']}"
        self.failed: str | None = None
        log.info("expert-parallel group %s: %d ranks on nodes %s", self.group_name, self.ep_size, sorted(set(node_ids)))

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
                raise GroupFailure(f"group {self.group_name}: {self.failed}") from exc
        return ray.get(refs)

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
