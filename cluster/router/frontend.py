"""Turning client requests into engine requests: validation, chat template, tokenization.

Runs in the router, shared by the gRPC and HTTP front ends, so replicas receive only token ids and
the cache-aware policy can match prefixes on the same ids the replicas cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from expertmesh.actors.sampling_params import InvalidRequestError, SamplingParams
from expertmesh.cluster.wire import sampling_from_proto
from expertmesh.cluster.router.reasoning import THINK_START
from expertmesh.cluster.router.errors import RouterError
from expertmesh.cluster.router.limits import Limits
from expertmesh.cluster.router.offload import OffLoop
from expertmesh.v1 import generate_pb2

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class PreparedRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    split_reasoning: bool
    starts_in_reasoning: bool  # the prompt already opened <think> (R1's template does)
    top_logprobs: int = 0  # alternatives per token to return (sampling.logprobs is at least 1 when on)


class Frontend:
    def __init__(self, tokenizer: Any, model_info: generate_pb2.ModelInfo, limits: Limits | None = None) -> None:
        self.tokenizer = tokenizer
        self.info = model_info
        self.model_name = model_info.id
        # What either API accepts: configured, else derived from the context (limits.py)
        self.limits = limits or Limits.resolve(model_info.max_context_length)
        self.max_request_bytes = self.limits.request_bytes
        # What unset fields mean, as the replica reports them (generation_config.json + config)
        self.sampling_defaults = SamplingParams()
        if model_info.HasField("default_sampling"):
            self.sampling_defaults = sampling_from_proto(model_info.default_sampling, SamplingParams())
        self.default_max_tokens = model_info.default_max_tokens or None
        self.max_sequence_tokens = min(model_info.max_sequence_tokens or model_info.max_context_length,
                                       model_info.max_context_length)
        self.off_loop = OffLoop()

    def check_size(self, size: int) -> None:
        self.limits.check_request_bytes(size)

    async def prepare_async(self, prepare: Any, request: Any) -> PreparedRequest:
        """`prepare(request)` (templating, tokenizing, checks) in a worker thread, after the size check."""
        size = request.ByteSize()
        self.check_size(size)
        return await self.off_loop.run(size, prepare, request)

    def default_sampling_fields(self) -> dict[str, Any]:
        """What unset fields mean here (for /v1/models): the replica's defaults."""
        d = self.info.default_sampling
        out: dict[str, Any] = {name: getattr(d, name) for name in ("temperature", "top_p", "top_k") if d.HasField(name)}
        out["max_tokens"] = f"rest of the context, at most {self.default_max_tokens or self.max_sequence_tokens}"
        return out

    # ---- pieces ------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise RouterError(grpc.StatusCode.NOT_FOUND,
                              f"model: {model!r} is not served here; available: {self.model_name!r}", "model")

    def encode(self, text: str, field: str | None = None) -> list[int]:
        """Token ids of `text`; with `field`, the text's size is checked first (what the client sent,
        not a template around it), so an oversized prompt costs no tokenizing."""
        if field is not None:
            self.limits.check_prompt_bytes(len(text.encode("utf-8", "surrogatepass")), field)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_prompt(self, messages: Sequence[dict[str, str]], field: str = "messages") -> str:
        if not messages:
            raise RouterError.invalid(field, "must contain at least one message")
        self.limits.check_messages(len(messages), field)
        for i, m in enumerate(messages):
            if m.get("role") not in CHAT_ROLES:
                raise RouterError.invalid(f"{field}[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise RouterError.invalid(f"{field}[{i}].content", "must be a string")
        self.limits.check_prompt_bytes(sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages), field)
        if messages[-1]["role"] == "assistant":
            raise RouterError.invalid(f"{field}[{len(messages) - 1}].role", "the last message must not be the assistant's")
        return self.tokenizer.apply_chat_template([dict(role=m["role"], content=m["content"]) for m in messages],
                                                  tokenize=False, add_generation_prompt=True)

    def check_prompt(self, ids: list[int], sampling: SamplingParams, max_tokens_given: bool,
                     field: str, max_tokens_field: str = "sampling.max_tokens",
                     unset_max_tokens: int | None = None) -> None:
        """Non-empty, in vocabulary, fits the context. An unset max_tokens is the rest of the
        context (and of what one rank's KV pool holds), at most `unset_max_tokens` or else the
        replica's default_max_tokens: a reasoning model is not cut off mid-thought."""
        if not ids:
            raise RouterError.invalid(field, "must not be empty")
        ctx = self.info.max_context_length
        self.limits.check_prompt_tokens(len(ids), field, ctx)
        vocab = self.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RouterError.invalid(field, f"token id {bad} is outside the vocabulary [0, {vocab})")
        prefix = "sampling." if max_tokens_field.startswith("sampling.") else ""  # gRPC's naming, or HTTP's
        if sampling.top_k > vocab:
            raise RouterError.invalid(prefix + "top_k", f"must be at most the vocabulary size {vocab}, got {sampling.top_k}")
        outside = next((t for t in sampling.stop_token_ids if t >= vocab), None)
        if outside is not None:
            raise RouterError.invalid(prefix + "stop_token_ids", f"token id {outside} is outside the vocabulary [0, {vocab})")
        if not max_tokens_given:
            room = self.max_sequence_tokens - len(ids)
            if room < 1:
                raise RouterError.invalid(field, f"{len(ids)} prompt tokens leave no room to generate: a "
                                          f"request may hold {self.max_sequence_tokens} tokens of KV")
            cap = unset_max_tokens or self.default_max_tokens or room
            sampling.max_tokens = min(room, cap)
        elif len(ids) + sampling.max_tokens > ctx:
            raise RouterError.invalid(max_tokens_field, f"{len(ids)} prompt tokens + max_tokens "
                                      f"{sampling.max_tokens} exceed the model's context of {ctx} tokens")

    def starts_in_reasoning(self, ids: Sequence[int]) -> bool:
        tail = self.tokenizer.decode(list(ids[-4:]), skip_special_tokens=False)
        return tail.rstrip().endswith(THINK_START)

    # ---- whole requests ----------------------------------------------------------------------
    def _sampling(self, msg: generate_pb2.SamplingParams) -> SamplingParams:
        try:
            return sampling_from_proto(msg, self.sampling_defaults, prefix="sampling.")
        except InvalidRequestError as exc:
            raise RouterError.from_invalid_request(exc) from None

    def prepare_generate(self, req: generate_pb2.GenerateRequest) -> PreparedRequest:
        self.check_model(req.model)
        sampling = self._sampling(req.sampling)
        which = req.WhichOneof("prompt")
        if which == "text":
            ids, field = self.encode(req.text, "text"), "text"
        elif which == "token_ids":
            ids, field = list(req.token_ids.ids), "token_ids"
        else:
            raise RouterError.invalid("prompt", "set text or token_ids")
        self.check_prompt(ids, sampling, req.sampling.HasField("max_tokens"), field)
        split = req.separate_reasoning
        return PreparedRequest(ids, sampling, split, split and self.starts_in_reasoning(ids),
                               req.sampling.top_logprobs)

    def prepare_chat(self, req: generate_pb2.ChatRequest) -> PreparedRequest:
        self.check_model(req.model)
        sampling = self._sampling(req.sampling)
        text = self.chat_prompt([{"role": m.role, "content": m.content} for m in req.messages])
        ids = self.encode(text)
        self.check_prompt(ids, sampling, req.sampling.HasField("max_tokens"), "messages")
        split = not req.merge_reasoning
        return PreparedRequest(ids, sampling, split, split and self.starts_in_reasoning(ids),
                               req.sampling.top_logprobs)
