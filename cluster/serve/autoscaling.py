"""Serve autoscaling on LLM signals: requests running and waiting in each engine replica.

Serve's default policy counts requests that pass through Serve handles; expertmesh's router talks
to replicas over gRPC, so replicas report their own load (`record_autoscaling_stats`) and this
policy sizes the deployment so that each replica carries about `target_ongoing_requests` and its
admission queue stays under `target_queue_depth`. Serve applies min/max and the up/downscale
delays on top.
"""
from __future__ import annotations

import math
from typing import Any

RUNNING = "running"
WAITING = "waiting"
KV_USAGE = "kv_usage"


def _metric(ctx: Any, name: str) -> dict:
    metrics = ctx.aggregated_metrics
    if callable(metrics):
        metrics = metrics()
    return (metrics or {}).get(name, {}) or {}


def llm_load_policy(ctx: Any, target_ongoing_requests: float = 4.0, target_queue_depth: float = 2.0,
                    max_kv_usage: float = 0.9) -> tuple[int, dict]:
    """desired = max(ceil(ongoing / target), current + 1 if queues or KV are past their targets)."""
    running = _metric(ctx, RUNNING)
    waiting = _metric(ctx, WAITING)
    kv = _metric(ctx, KV_USAGE)
    current = max(1, ctx.current_num_replicas)
    ongoing = sum(running.values()) + sum(waiting.values())
    desired = math.ceil(ongoing / target_ongoing_requests) if ongoing else 0
    per_replica_queue = sum(waiting.values()) / current
    if per_replica_queue > target_queue_depth or (kv and max(kv.values()) > max_kv_usage):
        desired = max(desired, ctx.current_num_replicas + 1)
    lo = getattr(ctx, "capacity_adjusted_min_replicas", 0)
    hi = getattr(ctx, "capacity_adjusted_max_replicas", desired)
    desired = min(max(desired, lo), hi)
    return desired, {"ongoing": ongoing, "queue_per_replica": per_replica_queue}
