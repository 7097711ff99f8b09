"""A request's life inside the engine: where it runs, which KV slots it holds, what it produced."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from expertmesh.actors.sampling_params import SamplingParams

from .detokenizer import IncrementalDetokenizer
from .prefix_cache import PrefixHandle
from .types import RequestMetrics, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams  # for a resumed request, max_tokens counts only what is left
    detok: IncrementalDetokenizer
    resumed: int = 0  # trailing prompt tokens that are output produced before a resume or retraction
    retractions: int = 0  # times the scheduler took its KV back to make room (it then resumed)
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    rank: int = -1
    handle: PrefixHandle | None = None
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    cached_tokens: int = 0
    computed: int = 0  # context tokens whose KV is in the rank's cache
    reserved: int = 0  # KV slots promised at admission and not yet allocated
    output: list[int] = field(default_factory=list)
    announced: bool = False  # the rank knows this request (NewRequest sent)
    finish_reason: str | None = None
    error: str | None = None
    # what the next delta carries
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # timing
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    itl_sum: float = 0.0
    trace: object | None = None  # per-request tracing state (telemetry.RequestTrace)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt) - self.computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def context_tokens(self) -> list[int]:
        """Tokens whose KV has been computed (prompt, then all outputs but the last sampled one)."""
        return (self.prompt + self.output)[: self.computed]

    def metrics(self) -> RequestMetrics:
        now = time.monotonic()
        n = len(self.output)
        return RequestMetrics(
            queue_time_s=(self.admitted_at or now) - self.arrival,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
            mean_itl_s=self.itl_sum / (n - 1) if n > 1 else None,
            e2e_s=now - self.arrival,
            prefill_tokens=len(self.prompt) - self.cached_tokens,
        )
