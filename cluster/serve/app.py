"""The Serve application: `expertmesh.cluster.serve.app:build_app` with args {"config": <DeployConfig>}.

Used by `expertmesh up` and by KubeRay's serveConfigV2 alike, so local and Kubernetes
deployments are built from one config.
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from expertmesh.cluster.config import DeployConfig

from .autoscaling import llm_load_policy
from .replica import EngineReplica, rank_bundles
from .router_deployment import Router

ENGINE_DEPLOYMENT = "EngineReplica"
ROUTER_DEPLOYMENT = "Router"


def autoscaling_config(cfg: DeployConfig) -> dict[str, Any]:
    a = cfg.autoscaling
    return {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "metrics_interval_s": a.metrics_interval_s,
        "look_back_period_s": a.look_back_period_s,
        "policy": {
            "policy_function": llm_load_policy,
            "policy_kwargs": {"target_ongoing_requests": a.target_ongoing_requests,
                              "target_queue_depth": a.target_queue_depth},
        },
    }


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: the router (ingress) bound to the autoscaled engine replicas."""
    if "config" not in args:
        raise ValueError("expertmesh's Serve application takes args {'config': <expertmesh config>}")
    cfg = DeployConfig.model_validate(args["config"])
    config = cfg.to_dict()
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        ray_actor_options={"num_cpus": cfg.parallel.engine_cpus},
        placement_group_bundles=rank_bundles(cfg),
        placement_group_strategy=cfg.parallel.placement_strategy,
        autoscaling_config=autoscaling_config(cfg),
        max_ongoing_requests=1000,
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=150.0,
        health_check_period_s=5.0,
    ).bind(config)
    router = serve.deployment(
        Router,
        name=ROUTER_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.1},
        graceful_shutdown_timeout_s=10.0,
    ).bind(config, engine)
    return router
