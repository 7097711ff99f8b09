"""A small synchronous Python client for the public expertmesh.v1 API.

    with GenerationClient("127.0.0.1:50051") as c:
        for delta in c.chat([{"role": "user", "content": "hi"}], max_tokens=64):
            print(delta.reasoning or delta.text, end="")

Leaving a stream early cancels the call, which aborts the request in the engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.v1 import generate_pb2, generate_pb2_grpc

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "ignore_eos",
                   "return_logprobs", "top_logprobs")
FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in generate_pb2.FinishReason.items()}


def sampling_proto(**kw: Any) -> generate_pb2.SamplingParams:
    """SamplingParams from keyword arguments; None leaves the server's default."""
    unknown = set(kw) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    msg = generate_pb2.SamplingParams()
    for name, value in kw.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(msg, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(msg, name, value)
    return msg


@dataclass
class Completion:
    """A whole streamed answer, merged."""

    request_id: str = ""
    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)

    def add(self, m: generate_pb2.GenerateResponse) -> None:
        self.request_id = m.request_id or self.request_id
        self.text += m.text
        self.reasoning += m.reasoning
        self.token_ids.extend(m.token_ids)
        if m.finish_reason:
            self.finish_reason = FINISH_NAMES.get(m.finish_reason, str(m.finish_reason))
            u = m.usage
            self.usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                          "total_tokens": u.total_tokens, "cached_tokens": u.cached_tokens}


class GenerationClient:
    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self.address = address
        self.token = token if token is not None else os.environ.get("EXPERTMESH_TOKEN") or None
        self.timeout = timeout
        if tls or root_certificates:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)

    def __enter__(self) -> "GenerationClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _metadata(self, request_id: str | None) -> list[tuple[str, str]]:
        md = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if request_id:
            md.append(("x-request-id", request_id))
        return md

    def _stream(self, method: Any, request: Any, request_id: str | None, timeout: float | None
                ) -> Iterator[generate_pb2.GenerateResponse]:
        call = method(request, timeout=timeout if timeout is not None else self.timeout,
                      metadata=self._metadata(request_id))
        try:
            yield from call
        finally:
            call.cancel()  # no-op after the end; aborts the request when the caller stops early

    def generate(self, prompt: str | Sequence[int], *, model: str = "", separate_reasoning: bool = False,
                 request_id: str | None = None, timeout: float | None = None, **sampling: Any
                 ) -> Iterator[generate_pb2.GenerateResponse]:
        req = generate_pb2.GenerateRequest(model=model, sampling=sampling_proto(**sampling),
                                           separate_reasoning=separate_reasoning)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return self._stream(self.stub.Generate, req, request_id, timeout)

    def chat(self, messages: Sequence[dict[str, str]], *, model: str = "", merge_reasoning: bool = False,
             request_id: str | None = None, timeout: float | None = None, **sampling: Any
             ) -> Iterator[generate_pb2.GenerateResponse]:
        req = generate_pb2.ChatRequest(model=model, sampling=sampling_proto(**sampling), merge_reasoning=merge_reasoning,
                                       messages=[generate_pb2.ChatMessage(role=m["role"], content=m["content"])
                                                 for m in messages])
        return self._stream(self.stub.Chat, req, request_id, timeout)

    def complete(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        out = Completion()
        for m in self.generate(prompt, **kw):
            out.add(m)
        return out

    def chat_complete(self, messages: Sequence[dict[str, str]], **kw: Any) -> Completion:
        out = Completion()
        for m in self.chat(messages, **kw):
            out.add(m)
        return out

    def list_models(self) -> list[generate_pb2.ModelCard]:
        return list(self.stub.ListModels(generate_pb2.ListModelsRequest(), timeout=self.timeout,
                                         metadata=self._metadata(None)).models)

    def model_info(self, model: str = "") -> generate_pb2.ModelInfo:
        return self.stub.GetModelInfo(generate_pb2.GetModelInfoRequest(model=model), timeout=self.timeout,
                                      metadata=self._metadata(None))

    def load(self) -> generate_pb2.GetLoadResponse:
        return self.stub.GetLoad(generate_pb2.GetLoadRequest(), timeout=self.timeout, metadata=self._metadata(None))

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 5.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
