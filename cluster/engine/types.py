"""Typed messages between the engine and whoever drives it (the CLI, the Serve replica, the router)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from expertmesh.actors.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    """One generation request, already tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    trace_context: dict[str, str] | None = None  # W3C traceparent carrier from the caller
    # Resuming a request another replica had started: its output so far (not streamed again) and
    # how many characters of text the client already has.
    resume_token_ids: list[int] = field(default_factory=list)
    resume_text_chars: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestMetrics:
    queue_time_s: float = 0.0
    ttft_s: float | None = None
    mean_itl_s: float | None = None
    e2e_s: float | None = None
    prefill_tokens: int = 0  # tokens actually computed in prefill (prompt minus cache hits)


@dataclass
class RequestOutput:
    """A streamed delta for one request: the tokens and text produced since the previous delta."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None


@dataclass
class LoadInfo:
    """What a replica reports for routing and autoscaling."""

    replica_id: str = ""
    running: int = 0
    waiting: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0
    cache_hit_rate: float = 0.0  # cached prompt tokens / prompt tokens, over the replica's life
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    kv_reserved_tokens: int = 0  # spoken for by admission beyond what is held (estimate or reservation)
    retractions_total: int = 0  # running requests whose KV was taken back (they resumed later)
    recomputed_tokens_total: int = 0  # tokens prefilled again after retractions
    admission: str = ""  # "use" | "lifetime"
    group_state: str = "ok"  # "ok" | "rebuilding" | "failed": the expert-parallel group
    group_rebuilds_total: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_used_tokens / self.kv_total_tokens if self.kv_total_tokens else 0.0
