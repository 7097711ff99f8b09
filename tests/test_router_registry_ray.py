"""Replica discovery through the named Ray actor: a replica registers its EngineService address,
the router finds it, and stops using it once it deregisters."""
from __future__ import annotations

import grpc
import pytest

from _router_env import LoopThread, start_replica, start_router, wait_for
from expertmesh.cluster.router.client import GenerationClient
from expertmesh.cluster.router.registry import REGISTRY_NAMESPACE, RayRegistrySource, RegistryClient
from expertmesh.cluster.router.synthetic import SyntheticEngine

NAME = "ReplicaRegistry-router-test"  # not the production name: other Ray tests may run one


def test_router_discovers_replicas_through_ray_registry(ray_cluster, tiny_ckpt):
    import ray

    lt = LoopThread()
    replica = start_replica(lt, SyntheticEngine(tiny_ckpt), tiny_ckpt, replica_id="ray-r1")
    reg = RegistryClient("ray-r1", replica.address, {"node": "head"}, heartbeat_s=0.2, name=NAME)
    try:
        lt.run(reg.start())
        actor = ray.get_actor(NAME, namespace=REGISTRY_NAMESPACE)
        version, entries = ray.get(actor.snapshot.remote())
        assert [(e["replica_id"], e["address"]) for e in entries] == [("ray-r1", replica.address)]
        router = start_router(lt, source=RayRegistrySource(name=NAME), policy="round_robin")
        with GenerationClient(router.grpc_address, timeout=20) as c:
            assert len(c.complete("hi", max_tokens=3).token_ids) == 3
            assert [r.replica_id for r in c.load().replicas] == ["ray-r1"]
        # A registry that restarted and lost its state: the heartbeat registers the replica again.
        ray.get(actor.deregister.remote("ray-r1"))
        assert wait_for(lambda: len(ray.get(actor.snapshot.remote())[1]) == 1, timeout=10)
        lt.run(reg.stop())  # draining: deregister
        assert wait_for(lambda: not router.replicas.replicas, timeout=10)
        with GenerationClient(router.grpc_address, timeout=20) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.complete("hi", max_tokens=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        lt.run(router.stop(0))
    finally:
        lt.run(replica.stop(0))
        ray.kill(ray.get_actor(NAME, namespace=REGISTRY_NAMESPACE))
        lt.close()
