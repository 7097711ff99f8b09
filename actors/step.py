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
class PlacementUpdate:
    """An expert-placement change riding on a step, the same on every rank (collectives pair up):
    `stage` copies/receives the new slots of some MoE layers into a staging buffer while the old
    ones keep serving; `commit` switches every staged layer at once, at the start of the step
    (before its forward and any collective of it)."""

    version: int
    stage: dict[int, list[int]] = field(default_factory=dict)  # MoE layer index → new slot_to_expert
    commit: bool = False


@dataclass
class StepInput:
    new_requests: list[NewRequest] = field(default_factory=list)
    seqs: list[SeqWork] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # requests whose state the rank drops
    remap: dict[str, list[int]] = field(default_factory=dict)  # new slot lists (prefix deduplicated)
    placement: PlacementUpdate | None = None  # expert weights to move before this step (EPLB)
    report_load: bool = False  # return cumulative expert load in StepOutput.expert_load

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
    eplb: float = 0.0  # staging / switching expert weights (a placement update)


@dataclass
class StepOutput:
    rank: int
    sampled: list[SampledToken] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)
    error: str | None = None
    # when asked (report_load): [MoE layer][expert] tokens routed from this rank's requests, and
    # [MoE layer] (token, expert) rows this rank's slots computed; both cumulative
    expert_load: list[list[int]] | None = None
    computed_rows: list[int] | None = None
