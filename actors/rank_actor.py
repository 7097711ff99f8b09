"""The Ray actor that hosts one rank of an expert-parallel group: a thin shell around ModelWorker
that forms the torch.distributed process group (NCCL on CUDA, gloo on CPU)."""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from .step import StepInput, StepOutput
from .worker import ModelWorker, WorkerSpec

log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """A rank raised inside a step; the message names the rank."""


class RankActor:
    """Use through `ray.remote(RankActor)`; kept a plain class so it can be tested without Ray."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.worker: ModelWorker | None = None
        torch.set_num_threads(max(1, int(os.environ.get("EXPERTMESH_TORCH_THREADS", "1"))))

    def node_address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((self.node_address(), 0))
            return s.getsockname()[1]

    def setup(self, init_method: str, timeout_s: float) -> dict:
        """Joins the process group (blocks until every rank has joined) and loads this rank's weights.
        `init_method`: tcp://MASTER:PORT across machines; file://PATH when every rank shares this
        machine (no rendezvous socket at all: torch's TCPStore listens on every interface)."""
        group = self._init_group(init_method, timeout_s) if self.spec.ep_size > 1 else None
        self.worker = ModelWorker(self.spec, group)
        return {
            "rank": self.spec.ep_rank,
            "pid": os.getpid(),
            "expert_range": list(self.worker.expert_range),
            "routed_expert_params": self.worker.routed_expert_param_count(),
            "weight_bytes": self.worker.model.weight_bytes(),
            "decode_graphs": self.worker.decode_graphs_status,
            "read_tensor_names": sorted(self.worker.read_tensor_names),
        }

    def _init_group(self, init_method: str, timeout_s: float):
        backend = "nccl" if self.spec.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=self.spec.ep_rank,
                                world_size=self.spec.ep_size, timeout=timedelta(seconds=timeout_s))
        return dist.group.WORLD

    def ping(self) -> int:
        return os.getpid()

    def regroup(self, init_method: str, timeout_s: float) -> dict:
        """A survivor joins the group re-formed around a replaced rank, keeping its weights and
        its requests' KV (the engine resumes them from its radix cache). A replacement whose first
        setup was cut short (another rank died meanwhile) sets up here instead."""
        if self.worker is None:
            if dist.is_initialized():
                dist.destroy_process_group()
            return self.setup(init_method, timeout_s)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - a group broken by a dead peer may not tear down cleanly
                log.warning("rank %d: destroying the broken group: %r", self.spec.ep_rank, exc)
        self.worker.set_group(self._init_group(init_method, timeout_s))
        log.info("rank %d rejoined the re-formed group", self.spec.ep_rank)
        return {"rank": self.spec.ep_rank, "pid": os.getpid()}

    def step(self, work: StepInput) -> StepOutput:
        assert self.worker is not None, "setup() first"
        try:
            return self.worker.step(work)
        except Exception as exc:  # surfaces as a clear, rank-naming error in the engine
            log.exception("rank %d failed in a step", self.spec.ep_rank)
            raise RankFailure(f"rank {self.spec.ep_rank} failed: {type(exc).__name__}: {exc}") from exc

    def expert_load(self, window_s: float | None = None) -> list[list[int]]:
        assert self.worker is not None
        return self.worker.expert_load(window_s).tolist()

    def inject_fault(self, message: str = "injected fault") -> None:
        """Makes the next step raise (for failure tests and drills)."""
        assert self.worker is not None
        worker = self.worker
        original = worker.step

        def failing(work: StepInput) -> StepOutput:
            worker.step = original
            raise RuntimeError(message)

        worker.step = failing

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
