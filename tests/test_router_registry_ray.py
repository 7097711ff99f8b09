"""Replica discovery through the named Ray actor: a replica registers its EngineService address,
the router finds it, and stops using it once it deregisters."""
from __future__ import annotations

import grpc
import pytest

from _router_env import LoopThread, start_replica, start_router, wait_for
from expertmesh.cluster.router.client import GenerationClient
from expertmesh.cluster.router.registry import RayRegistrySource, RegistryClient, RegistryRef
from expertmesh.cluster.devtools.synthetic import SyntheticEngine

REF = RegistryRef(app="router-test")  # an app of its own: other Ray tests may run one
OTHER = RegistryRef(app="router-test-other")


def test_router_discovers_replicas_through_ray_registry(ray_cluster, tiny_ckpt):
    import ray

    lt = LoopThread()
    replica = start_replica(lt, SyntheticEngine(tiny_ckpt), tiny_ckpt, replica_id="ray-r1")
    reg = RegistryClient("ray-r1", replica.address, {"node": "head"}, heartbeat_s=0.2, ref=REF)
    other = RegistryClient("other-r1", "127.0.0.1:1", heartbeat_s=0.2, ref=OTHER)  # another app's replica
    try:
        lt.run(reg.start())
        lt.run(other.start())
        actor = ray.get_actor(REF.actor_name, namespace=REF.namespace)
        version, entries = ray.get(actor.snapshot.remote())
        assert [(e["replica_id"], e["address"]) for e in entries] == [("ray-r1", replica.address)]
        router = start_router(lt, source=RayRegistrySource(ref=REF), policy="round_robin")
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
        lt.run(other.stop(deregister=False))
        lt.run(replica.stop(0))
        for ref in (REF, OTHER):
            ray.kill(ray.get_actor(ref.actor_name, namespace=ref.namespace))
        lt.close()


def test_a_replica_that_stops_heartbeating_expires(ray_cluster):
    """kill -9 leaves no deregistration behind: the TTL drops the entry."""
    import ray

    from expertmesh.cluster.router.registry import get_or_create_registry

    ref = RegistryRef(app="ttl-test")
    actor = get_or_create_registry(ref, ttl_s=1.0)
    try:
        ray.get(actor.register.remote("gone", "127.0.0.1:1", {}))
        assert [e["replica_id"] for e in ray.get(actor.snapshot.remote())[1]] == ["gone"]
        assert wait_for(lambda: not ray.get(actor.snapshot.remote())[1], timeout=10)
    finally:
        ray.kill(actor)


def test_replica_host_registers_serves_and_drains_without_serve(ray_cluster, tiny_ckpt):
    """The replica's wiring as a plain object (what Serve's EngineReplica wraps): it registers in its
    app's registry with its ranks, heart-beats, a router finds and uses it, and the drain deregisters."""
    import json

    import ray

    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.replica_host import ReplicaHost, ReplicaSettings

    ref = RegistryRef(app="host-test")
    lt = LoopThread()
    host = ReplicaHost(Engine(EngineConfig(str(tiny_ckpt))), ReplicaSettings("host-r1", app=ref.app,
                                                                             telemetry_metrics=False))
    try:
        address = lt.run(host.start())
        actor = ray.get_actor(ref.actor_name, namespace=ref.namespace)
        (entry,) = ray.get(actor.snapshot.remote())[1]
        assert entry["replica_id"] == "host-r1" and entry["address"] == address
        assert [r["rank"] for r in json.loads(entry["metadata"]["ranks"])] == [0]
        router = start_router(lt, source=RayRegistrySource(ref=ref), policy="round_robin")
        with GenerationClient(router.grpc_address, timeout=60) as c:
            assert len(c.complete("hi", max_tokens=3).token_ids) == 3
        assert lt.run(host.status())["replica_id"] == "host-r1"
        lt.run(host.drain_and_stop())
        assert not ray.get(actor.snapshot.remote())[1]
        assert wait_for(lambda: not router.replicas.replicas, timeout=10)
        lt.run(router.stop(0))
    finally:
        ray.kill(ray.get_actor(ref.actor_name, namespace=ref.namespace))
        lt.close()


def test_the_registry_outlives_the_placement_group_of_whoever_made_it(ray_cluster):
    """Serve runs replicas with placement_group_capture_child_tasks: a registry made from inside
    one must not land in (and die with) that replica's placement group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ref = RegistryRef(app="router-test-pg")

    @ray.remote(num_cpus=0.01)
    class Maker:  # stands in for an EngineReplica: the first to use the app's registry
        def make(self) -> str:
            from expertmesh.cluster.router.registry import get_or_create_registry

            return ray.get(get_or_create_registry(ref).internal_token.remote())

    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    maker = Maker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_capture_child_tasks=True)).remote()
    token = ray.get(maker.make.remote(), timeout=60)
    ray.kill(maker)
    remove_placement_group(pg)  # what Serve does when the replica is gone
    registry = ray.get_actor(ref.actor_name, namespace=ref.namespace)
    try:
        assert ray.get(registry.internal_token.remote(), timeout=20) == token  # alive, same state
    finally:
        ray.kill(registry)
