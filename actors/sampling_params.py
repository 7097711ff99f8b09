"""Per-request sampling parameters, shared by the engine (validation, stop handling) and the rank
workers (the sampler). Kept free of torch so both sides import it cheaply."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this temperature the sampler treats a request as greedy: dividing logits by a temperature
# near zero overflows fp32 and turns the softmax into NaN (vLLM uses the same epsilon).
SAMPLING_EPS = 1e-5
# Bounds of OpenAI's API where it has one (temperature), sane ones where it has none.
MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound
MAX_SEED = 2**63 - 1  # what a torch.Generator takes


class InvalidRequestError(ValueError):
    """A request parameter is out of range; `field` names it so APIs can report it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0  # number of top logprobs to return per token (0: none)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature ~0, or top_k == 1 (sampling from one token is an argmax)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self) -> "SamplingParams":
        """Raise InvalidRequestError naming the first bad field; return self for chaining."""
        def bad(name: str, msg: str) -> None:
            raise InvalidRequestError(name, msg)

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                bad(name, f"must be a number, got {value!r}")
        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not (0.0 <= self.temperature <= MAX_TEMPERATURE):
            bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1 or self.top_k == 0:
            bad("top_k", f"must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not (0.0 < self.repetition_penalty < float("inf")):
            bad("repetition_penalty", f"must be finite and > 0, got {self.repetition_penalty!r}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty!r}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            bad("seed", f"must be an integer in [0, 2^63 - 1], got {self.seed!r}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            bad("stop", f"each stop string at most {MAX_STOP_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if not is_int(self.logprobs) or not (0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        return self
