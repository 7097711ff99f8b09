"""The messages between the engine's scheduler and one rank worker, once per step.

A rank keeps, per running request, its context's KV slots and its sampling state, so each step
carries only what is new: the tokens to compute and the slots they go to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sampling_params import SamplingParams


@dataclass
class NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefix_slots: list[int]  # slots already holding the cached prefix's KV
    resumed: int = 0  # the last `resumed` prompt tokens are earlier output (a resumed request)


@dataclass
class SeqWork:
    request_id: str
    token_ids: list[int]  # tokens to compute this step (a prefill chunk, or the last sampled token)
    slots: list[int]  # where their KV goes
    sample: bool  # sample a token after this (the last prefill chunk, or decode)


@dataclass
class StepInput:
    new_requests: list[NewRequest] = field(default_factory=list)
    seqs: list[SeqWork] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # requests whose state the rank drops
    remap: dict[str, list[int]] = field(default_factory=dict)  # new slot lists (prefix deduplicated)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class SampledToken:
    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class StepTimings:
    """Seconds spent in each part of the step on this rank (sums over layers)."""

    total: float = 0.0
    attention: float = 0.0
    gate: float = 0.0
    dispatch: float = 0.0
    experts: float = 0.0
    combine: float = 0.0
    sample: float = 0.0


@dataclass
class StepOutput:
    rank: int
    sampled: list[SampledToken] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)
    error: str | None = None
