"""Issue 13's probe, table-driven: every input a careless or hostile client might send, over both
APIs, gets the expected code and a message naming the field as that API spells it, and the router
serves a good request right after each one.

gRPC goes through the generated stubs (raw bytes, for what no stub can serialize, through the same
channel); HTTP through a real HTTP client. Replicas are the real EngineService over the synthetic
engine: nothing here needs a model, so the ~100 cases take seconds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx2 as httpx  # the HTTP client the openai package ships with
import pytest
from google.protobuf.internal.encoder import _VarintBytes

from _router_env import LoopThread, start_replica, start_router
from expertmesh.cluster.devtools.synthetic import SyntheticEngine
from expertmesh.v1 import generate_pb2, generate_pb2_grpc

VOCAB, CTX = 129280, 2048  # the tiny checkpoint's
REQUEST_BYTES, PROMPT_BYTES, MESSAGES = 2 << 20, 64 << 10, 8  # small limits, so crossing them is cheap
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def env(tiny_ckpt):
    lt = LoopThread()
    replica = start_replica(lt, SyntheticEngine(tiny_ckpt), tiny_ckpt, replica_id="r0")
    limits = dict(max_request_bytes=REQUEST_BYTES, max_prompt_bytes=PROMPT_BYTES, max_messages=MESSAGES)
    router = start_router(lt, [f"r0={replica.address}"], http_port=0, **limits)
    locked = start_router(lt, [f"r0={replica.address}"], http_port=0, auth_token=TOKEN, **limits)
    assert (router.frontend.info.vocab_size, router.frontend.info.max_context_length) == (VOCAB, CTX)
    channels = {r: grpc.insecure_channel(r.grpc_address) for r in (router, locked)}
    http = httpx.Client(timeout=60)
    yield {"open": (router, channels[router]), "auth": (locked, channels[locked]), "http": http}
    http.close()
    for ch in channels.values():
        ch.close()
    for server in (router, locked, replica):
        lt.run(server.stop(0))
    lt.close()


# ---- building the inputs ---------------------------------------------------------------------------
def _ld(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: what a client that skips UTF-8 checks would send."""
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload


def gen(prompt: Any = (0, 5, 6), model: str = "", **sampling: Any) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(model=model, sampling=generate_pb2.SamplingParams(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


def chat(messages: Any = None, model: str = "", **sampling: Any) -> generate_pb2.ChatRequest:
    msgs = [generate_pb2.ChatMessage(role="user", content="hi")] if messages is None else [
        generate_pb2.ChatMessage(role=r, content=c) for r, c in messages]
    return generate_pb2.ChatRequest(model=model, messages=msgs, sampling=generate_pb2.SamplingParams(**sampling))


USER = {"role": "user", "content": "hi"}


@dataclass
class Case:
    name: str
    api: str  # "grpc" | "http"
    request: Any  # gRPC: a message or raw bytes; HTTP: a JSON-able body or raw bytes
    code: Any  # grpc.StatusCode | HTTP status
    field: str | None  # what the message (gRPC) / param (HTTP) names; None: no one field
    method: str = "Generate"  # gRPC method, or the HTTP path
    headers: dict[str, str] = field(default_factory=dict)  # gRPC metadata / HTTP headers
    says: str = ""  # a phrase the message must hold
    router: str = "open"

    def __str__(self) -> str:
        return f"{self.api}-{self.name}"


G, H = "grpc", "http"
INV, NF, UNAUTH = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED
CC, CP = "/v1/chat/completions", "/v1/completions"


def _grpc_cases() -> list[Case]:
    s = "sampling."
    bad_stop = _ld(1, b"") + _ld(2, b"hi") + _ld(4, _ld(10, b"ok") + _ld(10, b"\xc3("))
    return [
        # undecodable: non-UTF-8 in every string field, garbage
        Case("text-not-utf8", G, _ld(2, b"caf\xe9"), INV, "text", says="UTF-8"),
        Case("model-not-utf8", G, _ld(1, b"\xff") + _ld(2, b"hi"), INV, "model", says="UTF-8"),
        Case("stop-not-utf8", G, bad_stop, INV, s + "stop[1]", says="UTF-8"),
        Case("chat-content-not-utf8", G, _ld(2, _ld(1, b"user") + _ld(2, b"\x80abc")), INV, "messages[0].content",
             method="Chat", says="UTF-8"),
        Case("chat-role-not-utf8", G, _ld(2, _ld(1, b"us\xfer") + _ld(2, b"hi")), INV, "messages[0].role",
             method="Chat", says="UTF-8"),
        Case("garbage-bytes", G, b"\x12\xff\xff\xff", INV, "request", says="protobuf"),
        Case("model-info-not-utf8", G, _ld(1, b"\xfe"), INV, "model", method="GetModelInfo", says="UTF-8"),
        # the prompt
        Case("no-prompt", G, gen(None), INV, "prompt"),
        Case("empty-text", G, gen(""), INV, "text", says="empty"),
        Case("empty-token-ids", G, gen([]), INV, "token_ids", says="empty"),
        Case("token-id-outside-vocab", G, gen([0, VOCAB]), INV, "token_ids", says="vocabulary"),
        Case("negative-token-id", G, gen([0, -1]), INV, "token_ids", says="vocabulary"),
        Case("prompt-tokens-over-context", G, gen([5] * CTX), INV, "token_ids", says="router.max_prompt_tokens"),
        Case("prompt-bytes-over-limit", G, gen("a " * PROMPT_BYTES), INV, "text", says="router.max_prompt_bytes"),
        Case("request-over-limit", G, gen("a" * (REQUEST_BYTES + 10)), INV, "request", says="router.max_request_bytes"),
        Case("unknown-model", G, gen(model="gpt-9"), NF, "model"),
        Case("model-info-unknown-model", G, generate_pb2.GetModelInfoRequest(model="gpt-9"), NF, "model",
             method="GetModelInfo"),
        # sampling
        Case("temperature-negative", G, gen(temperature=-1), INV, s + "temperature"),
        Case("temperature-9", G, gen(temperature=9), INV, s + "temperature"),
        Case("temperature-1e30", G, gen(temperature=1e30), INV, s + "temperature"),
        Case("temperature-nan", G, gen(temperature=float("nan")), INV, s + "temperature"),
        Case("top-p-0", G, gen(top_p=0), INV, s + "top_p"),
        Case("top-p-1.5", G, gen(top_p=1.5), INV, s + "top_p"),
        Case("top-k-0", G, gen(top_k=0), INV, s + "top_k"),
        Case("top-k-minus-5", G, gen(top_k=-5), INV, s + "top_k"),
        Case("top-k-1e9", G, gen(top_k=10**9), INV, s + "top_k", says="vocabulary"),
        Case("min-p-2", G, gen(min_p=2), INV, s + "min_p"),
        Case("presence-penalty-3", G, gen(presence_penalty=3), INV, s + "presence_penalty"),
        Case("frequency-penalty-minus-3", G, gen(frequency_penalty=-3), INV, s + "frequency_penalty"),
        Case("repetition-penalty-0", G, gen(repetition_penalty=0), INV, s + "repetition_penalty"),
        Case("max-tokens-0", G, gen(max_tokens=0), INV, s + "max_tokens"),
        Case("max-tokens-negative", G, gen(max_tokens=-1), INV, s + "max_tokens"),
        Case("max-tokens-over-context", G, gen(max_tokens=CTX), INV, s + "max_tokens", says="context"),
        Case("seed-negative", G, gen(seed=-1), INV, s + "seed"),
        Case("stop-1mb", G, gen(stop=["x" * 1_000_000]), INV, s + "stop"),
        Case("stop-17-strings", G, gen(stop=[f"s{i}" for i in range(17)]), INV, s + "stop"),
        Case("stop-empty-string", G, gen(stop=[""]), INV, s + "stop"),
        Case("stop-ids-100k", G, gen(stop_token_ids=list(range(100_000))), INV, s + "stop_token_ids"),
        Case("stop-id-outside-vocab", G, gen(stop_token_ids=[10**8]), INV, s + "stop_token_ids", says="vocabulary"),
        Case("stop-id-negative", G, gen(stop_token_ids=[-1]), INV, s + "stop_token_ids"),
        Case("top-logprobs-21", G, gen(return_logprobs=True, top_logprobs=21), INV, s + "top_logprobs"),
        Case("top-logprobs-without-logprobs", G, gen(top_logprobs=3), INV, s + "top_logprobs"),
        # chat
        Case("chat-no-messages", G, chat([]), INV, "messages", method="Chat"),
        Case("chat-bad-role", G, chat([("wizard", "hi")]), INV, "messages[0].role", method="Chat"),
        Case("chat-ends-with-assistant", G, chat([("user", "hi"), ("assistant", "x")]), INV, "messages[1].role",
             method="Chat"),
        Case("chat-too-many-messages", G, chat([("user", "hi")] * (MESSAGES + 1)), INV, "messages",
             method="Chat", says="router.max_messages"),
        Case("chat-prompt-bytes", G, chat([("user", "a" * PROMPT_BYTES)] * 2), INV, "messages", method="Chat",
             says="router.max_prompt_bytes"),
        Case("chat-unknown-model", G, chat(model="gpt-9"), NF, "model", method="Chat"),
        Case("chat-bad-temperature", G, chat(temperature=5), INV, s + "temperature", method="Chat"),
        # metadata and credentials
        Case("request-id-too-long", G, gen(), INV, "x-request-id", headers={"x-request-id": "r" * 129}),
        Case("no-token", G, gen(), UNAUTH, None, router="auth", says="bearer token"),
        Case("wrong-token", G, gen(), UNAUTH, None, router="auth", headers={"authorization": "Bearer nope"},
             says="bearer token"),
        Case("no-token-not-utf8", G, _ld(2, b"\xff"), UNAUTH, None, router="auth", says="bearer token"),
    ]


def _http_cases() -> list[Case]:
    long_stop = {"prompt": [0, 5, 6], "stop": ["x" * 1_000_000]}
    return [
        # bodies that are not a request
        Case("malformed-json", H, b'{"prompt": "hi", ', 400, None, CP, says="not valid JSON"),
        Case("not-utf8-body", H, b'{"prompt": "\xff\xfe"}', 400, None, CP, says="could not be decoded"),
        Case("not-an-object", H, b'[1, 2, 3]', 400, None, CP, says="not a JSON object"),
        Case("empty-body", H, b"", 400, None, CC, says="is empty"),
        Case("body-over-limit", H, b'{"prompt": "' + b"x" * REQUEST_BYTES + b'"}', 413, None, CP,
             says="router.max_request_bytes"),
        # chat messages
        Case("no-messages-key", H, {"model": ""}, 400, "messages", CC),
        Case("messages-empty", H, {"messages": []}, 400, "messages", CC),
        Case("role-not-a-string", H, {"messages": [{"role": 5, "content": "x"}]}, 400, "messages[0].role", CC),
        Case("role-unknown", H, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", CC),
        Case("ends-with-assistant", H, {"messages": [USER, {"role": "assistant", "content": "x"}]}, 400,
             "messages[1].role", CC),
        Case("image-part", H, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
             "messages[0].content[0]", CC),
        Case("too-many-messages", H, {"messages": [USER] * (MESSAGES + 1)}, 400, "messages", CC,
             says="router.max_messages"),
        Case("chat-prompt-bytes", H, {"messages": [{"role": "user", "content": "a" * (PROMPT_BYTES + 1)}]}, 400,
             "messages", CC, says="router.max_prompt_bytes"),
        Case("chat-unknown-model", H, {"model": "gpt-9", "messages": [USER]}, 404, "model", CC),
        # sampling (chat)
        Case("temperature-9", H, {"messages": [USER], "temperature": 9}, 400, "temperature", CC),
        Case("temperature-negative", H, {"messages": [USER], "temperature": -0.5}, 400, "temperature", CC),
        Case("temperature-string", H, {"messages": [USER], "temperature": "hot"}, 400, "temperature", CC),
        Case("top-p-0", H, {"messages": [USER], "top_p": 0}, 400, "top_p", CC),
        Case("top-p-2", H, {"messages": [USER], "top_p": 2}, 400, "top_p", CC),
        Case("top-k-1e9", H, {"messages": [USER], "top_k": 10**9}, 400, "top_k", CC),
        Case("presence-penalty-2.5", H, {"messages": [USER], "presence_penalty": 2.5}, 400, "presence_penalty", CC),
        Case("frequency-penalty-minus-9", H, {"messages": [USER], "frequency_penalty": -9}, 400,
             "frequency_penalty", CC),
        Case("repetition-penalty-0", H, {"messages": [USER], "repetition_penalty": 0}, 400, "repetition_penalty", CC),
        Case("n-2", H, {"messages": [USER], "n": 2}, 400, "n", CC),
        Case("top-logprobs-21", H, {"messages": [USER], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", CC),
        Case("top-logprobs-without-logprobs", H, {"messages": [USER], "top_logprobs": 2}, 400, "top_logprobs", CC),
        Case("max-tokens-0", H, {"messages": [USER], "max_tokens": 0}, 400, "max_tokens", CC),
        Case("max-completion-tokens-over-context", H, {"messages": [USER], "max_completion_tokens": CTX}, 400,
             "max_completion_tokens", CC),
        Case("seed-1e30", H, {"messages": [USER], "seed": 10**30}, 400, "seed", CC),
        Case("stop-17", H, {"messages": [USER], "stop": [f"s{i}" for i in range(17)]}, 400, "stop", CC),
        Case("tools", H, {"messages": [USER], "tools": [{"type": "function"}]}, 400, "tools", CC),
        Case("response-format-json", H, {"messages": [USER], "response_format": {"type": "json_object"}}, 400,
             "response_format", CC),
        # completions
        Case("no-prompt", H, {"max_tokens": 2}, 400, "prompt", CP),
        Case("empty-prompt-ids", H, {"prompt": []}, 400, "prompt", CP),
        Case("empty-prompt-text", H, {"prompt": ""}, 400, "prompt", CP),
        Case("prompt-id-outside-vocab", H, {"prompt": [0, 10**9]}, 400, "prompt", CP, says="vocabulary"),
        Case("prompt-id-negative", H, {"prompt": [0, -3]}, 400, "prompt", CP),
        Case("two-prompts", H, {"prompt": ["a", "b"]}, 400, "prompt", CP),
        Case("prompt-tokens-over-context", H, {"prompt": [5] * CTX}, 400, "prompt", CP,
             says="router.max_prompt_tokens"),
        Case("prompt-bytes-over-limit", H, {"prompt": "a " * PROMPT_BYTES}, 400, "prompt", CP,
             says="router.max_prompt_bytes"),
        Case("completions-logprobs", H, {"prompt": [0, 5], "logprobs": 5}, 400, "logprobs", CP),
        Case("completions-temperature-1e30", H, {"prompt": [0, 5], "temperature": 1e30}, 400, "temperature", CP),
        Case("completions-stop-1mb", H, long_stop, 400, "stop", CP),
        Case("completions-stop-ids-100k", H, {"prompt": [0, 5], "stop_token_ids": list(range(100_000))}, 400,
             "stop_token_ids", CP),
        Case("completions-stop-id-outside-vocab", H, {"prompt": [0, 5], "stop_token_ids": [10**8]}, 400,
             "stop_token_ids", CP),
        Case("completions-max-tokens-negative", H, {"prompt": [0, 5], "max_tokens": -4}, 400, "max_tokens", CP),
        Case("completions-unknown-model", H, {"model": "gpt-9", "prompt": [0, 5]}, 404, "model", CP),
        Case("suffix", H, {"prompt": [0, 5], "suffix": "x"}, 400, "suffix", CP),
        # headers, credentials, routes
        Case("request-id-too-long", H, {"prompt": [0, 5]}, 400, "x-request-id", CP, headers={"x-request-id": "r" * 129}),
        Case("no-token", H, {"prompt": [0, 5]}, 401, None, CP, router="auth", says="bearer token"),
        Case("wrong-token", H, {"prompt": [0, 5]}, 401, None, CP, router="auth",
             headers={"authorization": "Bearer nope"}, says="bearer token"),
        Case("unknown-route", H, {"prompt": [0, 5]}, 404, None, "/v1/embeddings"),
    ]


CASES = _grpc_cases() + _http_cases()


def _good(api: str, router, channel, http: httpx.Client, headers: dict[str, str]) -> None:
    """A good request right after the bad one: the router still serves."""
    if api == G:
        stub = generate_pb2_grpc.GenerationStub(channel)
        out = list(stub.Generate(gen(max_tokens=2), timeout=30, metadata=tuple(headers.items())))
        assert sum(len(m.token_ids) for m in out) == 2
    else:
        r = http.post(f"{router.http_address}{CP}", json={"prompt": [0, 5, 6], "max_tokens": 2}, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text[:300]


def _grpc_call(case: Case, channel: grpc.Channel) -> grpc.RpcError:
    metadata = tuple(case.headers.items())
    streaming = case.method in ("Generate", "Chat")
    path = f"/expertmesh.v1.Generation/{case.method}"
    ser = (lambda b: b) if isinstance(case.request, bytes) else (lambda m: m.SerializeToString())
    if isinstance(case.request, bytes):
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            path, request_serializer=ser, response_deserializer=lambda b: b)
    else:
        stub = generate_pb2_grpc.GenerationStub(channel)
        call = getattr(stub, case.method)
    with pytest.raises(grpc.RpcError) as err:
        out = call(case.request, timeout=30, metadata=metadata)
        if streaming:
            list(out)
    return err.value


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_refused_naming_the_field(env, case: Case):
    router, channel = env[case.router]
    http: httpx.Client = env["http"]
    if case.api == G:
        exc = _grpc_call(case, channel)
        details = exc.details() or ""
        assert exc.code() == case.code, (exc.code(), details[:300])
        if case.field is not None:
            assert details.startswith(case.field + ":"), details[:300]
        assert case.says in details, details[:300]
        assert "Traceback" not in details and "DecodeError" not in details
    else:
        url = router.http_address + case.method
        headers = {"content-type": "application/json", **case.headers}
        body = case.request if isinstance(case.request, bytes) else json.dumps(case.request).encode()
        r = http.post(url, content=body, headers=headers)
        assert r.status_code == case.code, r.text[:300]
        err = r.json()["error"]  # OpenAI's error object, always
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["param"] == case.field, err
        if case.field is not None:
            assert err["message"].startswith(case.field + ":"), err
        assert case.says in err["message"], err
        assert r.headers.get("x-request-id"), r.headers
    good_headers = {"authorization": f"Bearer {TOKEN}"} if case.router == "auth" else {}
    _good(case.api, router, channel, http, good_headers)


def test_the_table_covers_the_probe():
    """The issue's probe had 71 inputs that must be refused; the table has them and more."""
    assert len(CASES) >= 71 and len({str(c) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("times", [3, 10])
def test_an_oversized_message_is_invalid_not_queue_full(env, times):
    """Well past router.max_request_bytes, a gRPC request is still INVALID_ARGUMENT naming its size
    and the limit (refused on the raw bytes, before parsing), never RESOURCE_EXHAUSTED, which
    clients read as "queue full, retry"; HTTP answers 413 in OpenAI's error object. The router
    serves the next request."""
    from expertmesh.cluster.decoding import grpc_receive_cap

    router, channel = env["open"]
    size = times * REQUEST_BYTES
    assert size < grpc_receive_cap(REQUEST_BYTES)
    msg = gen("a" * size)
    with pytest.raises(grpc.RpcError) as err:
        list(generate_pb2_grpc.GenerationStub(channel).Generate(msg, timeout=60))
    details = err.value.details()
    assert err.value.code() == INV, (err.value.code(), details[:300])
    assert details == (f"request: {msg.ByteSize()} bytes is over the limit of {REQUEST_BYTES} bytes "
                       "(router.max_request_bytes)"), details[:300]
    _good(G, router, channel, env["http"], {})
    r = env["http"].post(f"{router.http_address}{CP}", content=b'{"prompt": "' + b"a" * size + b'"}',
                         headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    err_body = r.json()["error"]
    assert err_body["code"] == "request_too_large" and str(REQUEST_BYTES) in err_body["message"], err_body
    _good(H, router, channel, env["http"], {})


def test_past_grpcs_own_cap_grpc_core_refuses_unread(env):
    """Past grpc-core's cap (16x the limit, at least 32 MiB: what bounds one call's memory) grpc-core
    refuses on the length prefix before reading the body, with its own RESOURCE_EXHAUSTED; its text
    says why. The router serves on."""
    from expertmesh.cluster.decoding import grpc_receive_cap

    router, channel = env["open"]
    cap = grpc_receive_cap(REQUEST_BYTES)
    with pytest.raises(grpc.RpcError) as err:
        list(generate_pb2_grpc.GenerationStub(channel).Generate(gen("a" * (cap + 10)), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than max" in err.value.details() and str(cap) in err.value.details()
    _good(G, router, channel, env["http"], {})


@pytest.mark.parametrize("request_bytes, field", [
    (_ld(1, b"r\xff1") + _ld(2, b"\x00\x05"), "request_id"),  # EngineGenerateRequest.request_id
    (_ld(2, b"\x00") + _ld(4, _ld(1, b"traceparent") + _ld(2, b"\xc3(")), 'trace_context["traceparent"]'),
    (b"\x0a\xff\xff", "request"),  # not a message at all
])
def test_the_replicas_engine_service_decodes_tolerantly(env, request_bytes, field):
    """The replica's EngineService refuses a request that does not parse as the router does:
    INVALID_ARGUMENT naming the field, not UNKNOWN "DecodeError"; then it serves the next one."""
    from expertmesh.v1 import engine_pb2, engine_pb2_grpc

    router, _ = env["open"]
    address = router.replicas.get("r0").address
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream("/expertmesh.v1.EngineService/Generate", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            list(call(request_bytes, timeout=30))
        details = err.value.details() or ""
        assert err.value.code() == INV, (err.value.code(), details[:300])
        assert details.startswith(field + ":") and "DecodeError" not in details, details[:300]
        good = engine_pb2.EngineGenerateRequest(request_id="ok-1", prompt_token_ids=[0, 5, 6],
                                                sampling=generate_pb2.SamplingParams(max_tokens=2))
        out = list(engine_pb2_grpc.EngineServiceStub(ch).Generate(good, timeout=30))
        assert sum(len(m.token_ids) for m in out) == 2


def test_limits_are_configurable_and_default_from_the_context():
    from expertmesh.cluster.config import RouterSection
    from expertmesh.cluster.router.config import RouterConfig
    from expertmesh.cluster.router.limits import Limits

    r1 = Limits.resolve(163840)  # DeepSeek-R1's context
    assert (r1.request_bytes, r1.prompt_bytes, r1.prompt_tokens, r1.messages, r1.request_id_chars) == (
        16 * 163840, 16 * 163840, 163839, 4096, 128)
    assert Limits.resolve(2048).request_bytes == 1 << 20  # the floor
    section = RouterSection(max_messages=3, max_prompt_tokens=10**9, max_request_id_chars=16)
    limits = RouterConfig.from_deploy_section(section, replicas=["127.0.0.1:1"]).limits(2048)
    assert (limits.messages, limits.prompt_tokens, limits.request_id_chars) == (3, 2047, 16)  # never past the context
