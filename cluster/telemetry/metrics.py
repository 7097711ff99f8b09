"""Engine metrics through ray.util.metrics, so they reach the Ray dashboard's Prometheus/Grafana.

Ray exports each metric with a `ray_` prefix (e.g. `ray_expertmesh_time_to_first_token_seconds`).
One `EngineMetrics` per engine replica; it is fed from the engine thread after every step (gauges,
per-step timings, expert load) and for every finished request (latency histograms, counters).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type names only: the router imports this module too
    from expertmesh.cluster.engine.engine import Engine
    from expertmesh.cluster.engine.types import RequestOutput

log = logging.getLogger(__name__)

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]

METRIC_NAMES = (
    "expertmesh_requests_total", "expertmesh_time_to_first_token_seconds", "expertmesh_inter_token_latency_seconds",
    "expertmesh_request_latency_seconds", "expertmesh_prompt_tokens_total", "expertmesh_generation_tokens_total",
    "expertmesh_cached_prompt_tokens_total", "expertmesh_queue_depth", "expertmesh_running_requests",
    "expertmesh_kv_usage_ratio", "expertmesh_prefix_cache_hit_ratio", "expertmesh_expert_tokens_total",
    "expertmesh_alltoall_seconds", "expertmesh_step_seconds",
    "expertmesh_kv_reserved_ratio",
)
# Exported once the pool ran short and a request was retracted.
RETRACTION_METRIC_NAMES = ("expertmesh_retractions_total", "expertmesh_recomputed_tokens_total")

# Exported by replicas with expert load balancing on (eplb.enabled, ep_size > 1).
EPLB_METRIC_NAMES = ("expertmesh_eplb_balancedness", "expertmesh_eplb_rebalances_total",
                     "expertmesh_eplb_rebalance_seconds", "expertmesh_eplb_move_seconds",
                     "expertmesh_eplb_redundant_slots")

# Router-side: exported once a replica has failed under a request.
ROUTER_METRIC_NAMES = ("expertmesh_recoveries_total", "expertmesh_resumed_requests_total",
                       "expertmesh_recovery_seconds")


class RouterMetrics:
    """Requests that survived a replica or rank failure (the router resumed them elsewhere)."""

    def __init__(self, app: str):
        from ray.util import metrics as m

        self.tags = {"app": app}
        keys = tuple(self.tags)
        self.recoveries = m.Counter("expertmesh_recoveries_total",
                                    "Requests a replica failed under that went on on another replica", tag_keys=keys)
        self.resumed = m.Counter("expertmesh_resumed_requests_total",
                                 "Streams resumed mid-way (prompt + tokens already streamed)", tag_keys=keys)
        self.recovery_s = m.Histogram("expertmesh_recovery_seconds",
                                      "From a replica failing under a request to the next replica's first message",
                                      boundaries=LATENCY_BUCKETS, tag_keys=keys)

    def on_recovery(self, seconds: float, resumed_tokens: int) -> None:
        self.recoveries.inc(1, tags=self.tags)
        if resumed_tokens:
            self.resumed.inc(1, tags=self.tags)
        self.recovery_s.observe(seconds, tags=self.tags)


class EngineMetrics:
    def __init__(self, replica_id: str, model: str):
        from ray.util import metrics as m

        self.tags = {"replica": replica_id, "model": model}
        keys = ("replica", "model")
        self.requests = m.Counter("expertmesh_requests_total", "Finished requests by finish status",
                                  tag_keys=keys + ("status",))
        self.ttft = m.Histogram("expertmesh_time_to_first_token_seconds", "Time to first token",
                                boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.itl = m.Histogram("expertmesh_inter_token_latency_seconds", "Mean inter-token latency per request",
                               boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.e2e = m.Histogram("expertmesh_request_latency_seconds", "End-to-end request latency",
                               boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.prompt_tokens = m.Counter("expertmesh_prompt_tokens_total", "Prompt tokens of finished requests",
                                       tag_keys=keys)
        self.gen_tokens = m.Counter("expertmesh_generation_tokens_total", "Generated tokens", tag_keys=keys)
        self.cached_tokens = m.Counter("expertmesh_cached_prompt_tokens_total",
                                       "Prompt tokens served from the prefix cache", tag_keys=keys)
        self.queue = m.Gauge("expertmesh_queue_depth", "Requests waiting for admission", tag_keys=keys)
        self.running = m.Gauge("expertmesh_running_requests", "Requests running", tag_keys=keys)
        self.kv_usage = m.Gauge("expertmesh_kv_usage_ratio", "KV slots held by running requests / total",
                                tag_keys=keys)
        self.hit_rate = m.Gauge("expertmesh_prefix_cache_hit_ratio", "Cached prompt tokens / prompt tokens",
                                tag_keys=keys)
        self.expert_tokens = m.Counter("expertmesh_expert_tokens_total", "Tokens routed to each expert",
                                       tag_keys=keys + ("layer", "expert"))
        self.alltoall = m.Histogram("expertmesh_alltoall_seconds", "All-to-all (dispatch + combine) time per step",
                                    boundaries=STEP_BUCKETS, tag_keys=keys)
        self.step_time = m.Histogram("expertmesh_step_seconds", "Engine step time", boundaries=STEP_BUCKETS,
                                     tag_keys=keys)
        self.kv_reserved = m.Gauge("expertmesh_kv_reserved_ratio",
                                   "KV admission counts as spoken for beyond what is held (estimated growth "
                                   "or lifetime reservations) / total", tag_keys=keys)
        self.retractions = m.Counter("expertmesh_retractions_total",
                                     "Running requests whose KV was taken back to make room (they resume)",
                                     tag_keys=keys)
        self.recomputed = m.Counter("expertmesh_recomputed_tokens_total",
                                    "Tokens prefilled again after retractions", tag_keys=keys)
        self.eplb_balancedness = m.Gauge(
            "expertmesh_eplb_balancedness", "Mean / max tokens per rank of each MoE layer: measured (rows the "
            "ranks computed, last window), or the balancer's view before / after its last rebalance",
            tag_keys=keys + ("layer", "phase"))
        self.eplb_rebalances = m.Counter("expertmesh_eplb_rebalances_total", "Expert placements switched in",
                                         tag_keys=keys)
        self.eplb_duration = m.Histogram("expertmesh_eplb_rebalance_seconds",
                                         "First staged step to switch-over of a rebalance (serving continues)",
                                         boundaries=STEP_BUCKETS, tag_keys=keys)
        self.eplb_move = m.Histogram("expertmesh_eplb_move_seconds",
                                     "Step time the ranks spent moving expert weights, per rebalance",
                                     boundaries=STEP_BUCKETS, tag_keys=keys)
        self.eplb_slots = m.Gauge("expertmesh_eplb_redundant_slots", "Redundant expert slots (all MoE layers)",
                                  tag_keys=keys)
        self._last_rebalances = 0
        self._last_retractions = (0, 0)
        self._last_expert_load: list[list[int]] | None = None

    def set_gauges(self, load) -> None:
        """Also called when the replica is idle (from its autoscaling-stats callback), so the gauges
        stay fresh between steps."""
        t = self.tags
        self.queue.set(load.waiting, tags=t)
        self.running.set(load.running, tags=t)
        self.kv_usage.set(load.kv_usage, tags=t)
        self.hit_rate.set(load.cache_hit_rate, tags=t)
        total = load.kv_total_tokens or 1
        self.kv_reserved.set(load.kv_reserved_tokens / total, tags=t)
        retracted, recomputed = load.retractions_total, load.recomputed_tokens_total
        last_r, last_c = self._last_retractions
        if retracted > last_r:
            self.retractions.inc(retracted - last_r, tags=t)
        if recomputed > last_c:
            self.recomputed.inc(recomputed - last_c, tags=t)
        self._last_retractions = (retracted, recomputed)

    def on_step(self, engine: "Engine", outputs: list[RequestOutput]) -> None:
        t = self.tags
        self.set_gauges(engine.load())
        self.step_time.observe(engine.stats.last_step_s, tags=t)
        if engine.config.ep_size > 1:
            self.alltoall.observe(engine.stats.last_alltoall_s, tags=t)
        generated = sum(len(o.token_ids) for o in outputs)
        if generated:
            self.gen_tokens.inc(generated, tags=t)
        for o in outputs:
            if o.finished:
                self.on_finished(o)

    def on_finished(self, o: RequestOutput) -> None:
        t = self.tags
        self.requests.inc(1, tags={**t, "status": o.finish_reason or "stop"})
        if o.prompt_tokens:
            self.prompt_tokens.inc(o.prompt_tokens, tags=t)
        if o.cached_tokens:
            self.cached_tokens.inc(o.cached_tokens, tags=t)
        if o.metrics is not None:
            if o.metrics.ttft_s is not None:
                self.ttft.observe(o.metrics.ttft_s, tags=t)
            if o.metrics.mean_itl_s is not None:
                self.itl.observe(o.metrics.mean_itl_s, tags=t)
            if o.metrics.e2e_s is not None:
                self.e2e.observe(o.metrics.e2e_s, tags=t)

    def record_eplb(self, stats: dict) -> None:
        """The balancer's stats (EplbStats.as_dict): gauges, plus the rebalances since the last call."""
        t = self.tags
        self.eplb_slots.set(stats["redundant_slots"], tags=t)
        for phase, key in (("measured", "balancedness"), ("before", "balancedness_before"),
                           ("after", "balancedness_after")):
            for layer, b in enumerate(stats[key]):
                self.eplb_balancedness.set(b, tags={**t, "layer": str(layer), "phase": phase})
        if stats["rebalances"] > self._last_rebalances:
            self.eplb_rebalances.inc(stats["rebalances"] - self._last_rebalances, tags=t)
            self.eplb_duration.observe(stats["last_duration_s"], tags=t)
            self.eplb_move.observe(stats["last_move_s"], tags=t)
            self._last_rebalances = stats["rebalances"]

    def record_expert_load(self, per_rank: list[list[list[int]]]) -> None:
        """Adds the tokens routed per (layer, expert) since the last call (cumulative counts in)."""
        total = [[sum(r[layer][e] for r in per_rank) for e in range(len(per_rank[0][layer]))]
                 for layer in range(len(per_rank[0]))] if per_rank and per_rank[0] else []
        prev = self._last_expert_load
        for layer, row in enumerate(total):
            for e, n in enumerate(row):
                d = n - (prev[layer][e] if prev else 0)
                if d > 0:
                    self.expert_tokens.inc(d, tags={**self.tags, "layer": str(layer), "expert": str(e)})
        self._last_expert_load = total
