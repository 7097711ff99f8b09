"""The router in front of a REAL engine replica: a real AsyncEngine on the tiny checkpoint, served
by the real EngineService, behind the real router; real clients (grpcio, grpcurl, openai) over
127.0.0.1."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from _router_env import LoopThread, grpcurl_bin, real_engine, self_signed_cert, start_replica, start_router, wait_for
from expertmesh.actors.sampling_params import SamplingParams
from expertmesh.cluster.router.reasoning import ReasoningParser
from expertmesh.cluster.engine.types import EngineRequest
from expertmesh.cluster.router.client import GenerationClient
from expertmesh.v1 import generate_pb2, generate_pb2_grpc

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def env(tiny_ckpt: Path):
    """One replica (prefix cache off, so 'KV back to full' means free == total) and a router with
    the OpenAI-compatible HTTP API."""
    lt = LoopThread()
    engine = real_engine(tiny_ckpt, kv_tokens=4096, prefix_cache=False)
    replica = start_replica(lt, engine, tiny_ckpt, replica_id="r0")
    router = start_router(lt, [f"r0={replica.address}"], http_port=0, policy="cache_aware")
    yield dict(lt=lt, engine=engine, replica=replica, router=router, ckpt=tiny_ckpt)
    lt.run(router.stop(0))
    lt.run(replica.stop(0))
    engine.shutdown()
    lt.close()


@pytest.fixture()
def stub(env):
    with grpc.insecure_channel(env["router"].grpc_address) as ch:
        yield generate_pb2_grpc.GenerationStub(ch)


def _kv_full(engine) -> bool:
    load = engine.load()
    return load.running == 0 and load.waiting == 0 and engine.kv_free_slots() == engine.kv_total_slots()


def _direct(env, token_ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """The engine's own output for a request, without gRPC."""
    async def run():
        text, ids = "", []
        req = EngineRequest("direct-" + str(len(token_ids)) + "-" + str(max_tokens), token_ids,
                            SamplingParams(max_tokens=max_tokens, temperature=0.0))
        async for out in env["engine"].generate(req):
            text += out.text
            ids += out.token_ids
        return text, ids
    return env["lt"].run(run())


def _split(text: str) -> tuple[str, str]:
    parser = ReasoningParser(starts_in_reasoning=True)
    (r1, c1), (r2, c2) = parser.feed(text), parser.finish()
    return r1 + r2, c1 + c2


def test_streamed_generation_equals_engine(env, stub):
    tok = env["engine"].tokenizer
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(prompt, add_special_tokens=False)
    want_text, want_ids = _direct(env, ids, 24)
    msgs = list(stub.Generate(generate_pb2.GenerateRequest(
        text=prompt, sampling=generate_pb2.SamplingParams(max_tokens=24, temperature=0.0))))
    assert len(msgs) > 1, "expected a stream of deltas"
    assert "".join(m.text for m in msgs) == want_text
    assert [t for m in msgs for t in m.token_ids] == want_ids
    last = msgs[-1]
    assert last.finish_reason in (generate_pb2.FINISH_REASON_LENGTH, generate_pb2.FINISH_REASON_STOP)
    assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(want_ids)
    assert last.usage.total_tokens == len(ids) + len(want_ids)
    assert all(not m.finish_reason for m in msgs[:-1])
    # The same prompt as token ids: same answer.
    msgs2 = list(stub.Generate(generate_pb2.GenerateRequest(
        token_ids=generate_pb2.TokenIds(ids=ids), sampling=generate_pb2.SamplingParams(max_tokens=24, temperature=0.0))))
    assert "".join(m.text for m in msgs2) == want_text


def test_logprobs(env, stub):
    msgs = list(stub.Generate(generate_pb2.GenerateRequest(text="Once upon a time", sampling=generate_pb2.SamplingParams(
        max_tokens=6, temperature=0.0, return_logprobs=True, top_logprobs=3))))
    lps = [lp for m in msgs for lp in m.logprobs]
    assert [lp.token_id for lp in lps] == [t for m in msgs for t in m.token_ids]
    for lp in lps:  # greedy: the sampled token is the most likely one
        assert len(lp.top) == 3 and lp.logprob <= 0 and lp.top[0].token_id == lp.token_id
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
    plain = list(stub.Generate(generate_pb2.GenerateRequest(text="Once upon a time", sampling=generate_pb2.SamplingParams(
        max_tokens=3, temperature=0.0, return_logprobs=True))))
    assert all(len(m.logprobs) == len(m.token_ids) and not any(lp.top for lp in m.logprobs) for m in plain)


def test_chat_applies_template_and_splits_reasoning(env, stub):
    tok = env["engine"].tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    want_text, _ = _direct(env, ids, 12)
    msgs = list(stub.Chat(generate_pb2.ChatRequest(
        messages=[generate_pb2.ChatMessage(**m) for m in messages],
        sampling=generate_pb2.SamplingParams(max_tokens=12, temperature=0.0))))
    reasoning, text = "".join(m.reasoning for m in msgs), "".join(m.text for m in msgs)
    # R1's template opens <think>, so the answer starts as reasoning.
    assert (reasoning, text) == _split(want_text) and reasoning
    assert msgs[-1].usage.prompt_tokens == len(ids)
    merged = list(stub.Chat(generate_pb2.ChatRequest(
        messages=[generate_pb2.ChatMessage(**m) for m in messages], merge_reasoning=True,
        sampling=generate_pb2.SamplingParams(max_tokens=12, temperature=0.0))))
    assert "".join(m.text for m in merged) == want_text and not any(m.reasoning for m in merged)


def test_cancel_mid_stream_frees_kv(env, stub):
    engine = env["engine"]
    call = stub.Generate(generate_pb2.GenerateRequest(
        text="Tell me a very long story.", sampling=generate_pb2.SamplingParams(max_tokens=1500, ignore_eos=True)))
    got = [next(call) for _ in range(3)]
    assert all(m.token_ids for m in got)
    assert engine.load().running == 1 and engine.kv_free_slots() < engine.kv_total_slots()
    call.cancel()
    assert wait_for(lambda: _kv_full(engine), timeout=10), engine.load()
    assert call.code() == grpc.StatusCode.CANCELLED


def test_deadline_exceeded_aborts_in_engine(env, stub):
    engine = env["engine"]
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Generate(generate_pb2.GenerateRequest(
                text="Count to a thousand.", sampling=generate_pb2.SamplingParams(max_tokens=1500, ignore_eos=True)),
                timeout=0.6):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: _kv_full(engine), timeout=10), engine.load()


def test_request_id_echoed_or_generated(env, stub):
    call = stub.Generate(generate_pb2.GenerateRequest(text="hi", sampling=generate_pb2.SamplingParams(max_tokens=2)),
                         metadata=(("x-request-id", "req-123"),))
    msgs = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "req-123"
    assert all(m.request_id == "req-123" for m in msgs)
    assert dict(call.trailing_metadata())["x-replica-id"] == "r0"
    call = stub.Generate(generate_pb2.GenerateRequest(text="hi", sampling=generate_pb2.SamplingParams(max_tokens=2)))
    msgs = list(call)
    rid = dict(call.initial_metadata())["x-request-id"]
    assert len(rid) >= 16 and msgs[0].request_id == rid


S = generate_pb2.SamplingParams
BAD = [
    (dict(text="hi", sampling=S(temperature=-1.0)), "INVALID_ARGUMENT", "sampling.temperature"),
    (dict(text="hi", sampling=S(top_p=0.0)), "INVALID_ARGUMENT", "sampling.top_p"),
    (dict(text="hi", sampling=S(top_k=0)), "INVALID_ARGUMENT", "sampling.top_k"),
    (dict(text="hi", sampling=S(max_tokens=0)), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (dict(text="hi", sampling=S(max_tokens=5000)), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (dict(text="hi", sampling=S(min_p=1.5)), "INVALID_ARGUMENT", "sampling.min_p"),
    (dict(text="hi", sampling=S(seed=-3)), "INVALID_ARGUMENT", "sampling.seed"),
    (dict(text="hi", sampling=S(presence_penalty=3.0)), "INVALID_ARGUMENT", "sampling.presence_penalty"),
    (dict(text="hi", sampling=S(stop=[""])), "INVALID_ARGUMENT", "sampling.stop"),
    (dict(text="hi", sampling=S(return_logprobs=True, top_logprobs=21)), "INVALID_ARGUMENT", "sampling.top_logprobs"),
    (dict(text="hi", sampling=S(top_logprobs=2)), "INVALID_ARGUMENT", "sampling.top_logprobs"),
    (dict(), "INVALID_ARGUMENT", "prompt"),
    (dict(text=""), "INVALID_ARGUMENT", "text"),
    (dict(token_ids=generate_pb2.TokenIds(ids=[1, 10_000_000])), "INVALID_ARGUMENT", "token_ids"),
    (dict(token_ids=generate_pb2.TokenIds(ids=[5] * 2048)), "INVALID_ARGUMENT", "token_ids"),
    (dict(text="hi", model="no-such-model"), "NOT_FOUND", "model"),
]


@pytest.mark.parametrize("fields,code,field", BAD, ids=[b[2] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_generate_requests(stub, fields, code, field):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(generate_pb2.GenerateRequest(**fields)))
    assert err.value.code().name == code
    assert err.value.details().startswith(field + ":") or field in err.value.details(), err.value.details()


@pytest.mark.parametrize("messages,field", [
    ([], "messages"),
    ([dict(role="wizard", content="hi")], "messages[0].role"),
    ([dict(role="user", content="hi"), dict(role="assistant", content="x")], "messages[1].role"),
])
def test_bad_chat_requests(stub, messages, field):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(generate_pb2.ChatRequest(messages=[generate_pb2.ChatMessage(**m) for m in messages])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_models_info_load_and_health(env, stub):
    models = stub.ListModels(generate_pb2.ListModelsRequest()).models
    assert [m.id for m in models] == [env["router"].frontend.model_name]
    info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest())
    assert info.vocab_size == 129280 and info.n_routed_experts == 16 and info.reasoning_model
    load = stub.GetLoad(generate_pb2.GetLoadRequest())
    assert load.policy == "cache_aware" and [r.replica_id for r in load.replicas] == ["r0"]
    assert load.replicas[0].healthy and load.replicas[0].kv_total_tokens == env["engine"].kv_total_slots()
    assert load.replicas[0].max_waiting == 64 and load.replicas[0].prompt_tokens_total > 0
    with grpc.insecure_channel(env["router"].grpc_address) as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        for service in ("", "expertmesh.v1.Generation"):
            assert hs.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_python_client(env):
    with GenerationClient(env["router"].grpc_address) as c:
        out = c.complete("hello", max_tokens=5, temperature=0.0)
        assert len(out.token_ids) == 5 and out.usage["completion_tokens"] == 5 and out.finish_reason == "length"
        assert c.health() == "SERVING" and c.list_models()[0].id == env["router"].frontend.model_name
        # Stopping early cancels the stream, and the engine frees the request.
        stream = c.generate("a long one", max_tokens=1500, ignore_eos=True)
        next(stream)
        stream.close()
    assert wait_for(lambda: _kv_full(env["engine"]), timeout=10)


# ---- auth and TLS ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_router(env, tmp_path_factory):
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    from expertmesh.cluster.router.config import RouterConfig
    from expertmesh.cluster.router.server import RouterServer

    cfg = RouterConfig(grpc_port=0, replicas=[f"r0={env['replica'].address}"], auth_token=TOKEN,
                       tls_cert_file=str(cert), tls_key_file=str(key), probe_interval_s=0.2)
    router = RouterServer(cfg, frontend=env["router"].frontend)
    env["lt"].run(router.start())
    yield router, cert.read_bytes()
    env["lt"].run(router.stop(0))


def test_auth_over_tls(tls_router):
    router, ca = tls_router
    creds = grpc.ssl_channel_credentials(ca)
    req = generate_pb2.GenerateRequest(text="hi", sampling=generate_pb2.SamplingParams(max_tokens=2))
    with grpc.secure_channel(router.grpc_address, creds) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        for metadata, why in [((), "missing"), ((("authorization", "Bearer wrong"),), "invalid"),
                              ((("authorization", TOKEN),), "invalid")]:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(generate_pb2.ListModelsRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        msgs = list(stub.Generate(req, metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert sum(len(m.token_ids) for m in msgs) == 2
        # Health stays open for probes.
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with GenerationClient(router.grpc_address, token=TOKEN, root_certificates=ca) as c:
        assert len(c.complete("hi", max_tokens=3).token_ids) == 3
    with grpc.insecure_channel(router.grpc_address) as ch:  # plaintext to a TLS port fails
        with pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GenerationStub(ch).ListModels(generate_pb2.ListModelsRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- grpcurl ------------------------------------------------------------------------------------
def _json_stream(text: str) -> list[dict]:
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
    return out


def test_grpcurl_reflection_health_and_generate(env):
    exe, addr = grpcurl_bin(), env["router"].grpc_address
    run = lambda *args: subprocess.run([exe, "-plaintext", "-max-time", "20", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=30)
    listed = run(addr, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"expertmesh.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    described = run(addr, "describe", "expertmesh.v1.Generation")
    assert "rpc Generate" in described.stdout and "stream .expertmesh.v1.GenerateResponse" in described.stdout
    health = run("-d", '{"service": "expertmesh.v1.Generation"}', addr, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING"
    gen = run("-d", '{"text": "Hello there", "sampling": {"max_tokens": 6, "temperature": 0}}',
              "-H", "x-request-id: grpcurl-1", addr, "expertmesh.v1.Generation/Generate")
    assert gen.returncode == 0, gen.stderr
    msgs = _json_stream(gen.stdout)
    assert len(msgs) >= 2 and all(m["request_id"] == "grpcurl-1" for m in msgs)
    assert msgs[-1]["finish_reason"] == "FINISH_REASON_LENGTH" and msgs[-1]["usage"]["completion_tokens"] == 6
    bad = run("-d", '{"text": "hi", "sampling": {"temperature": -1}}', addr, "expertmesh.v1.Generation/Generate")
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "sampling.temperature" in bad.stderr


# ---- OpenAI-compatible HTTP ------------------------------------------------------------------------
def test_openai_client_streams_chat_completion(env):
    import openai

    tok = env["engine"].tokenizer
    messages = [{"role": "user", "content": "Write a haiku about routers."}]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    want_text, _ = _direct(env, ids, 10)
    client = openai.OpenAI(base_url=env["router"].http_address + "/v1", api_key="unused", max_retries=0, timeout=30)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    content, reasoning, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            finish = choice.finish_reason or finish
    assert (reasoning, content) == _split(want_text) and reasoning
    assert finish == "length" and usage.completion_tokens == 10 and usage.prompt_tokens == len(ids)
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    msg = full.choices[0].message
    assert (msg.model_extra.get("reasoning_content") or "") + (msg.content or "") == reasoning + content
    with_lp = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content_lp = with_lp.choices[0].logprobs.content
    assert len(content_lp) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content_lp)
    comp = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=6, temperature=0)
    want, _ = _direct(env, tok.encode("The quick brown fox", add_special_tokens=False), 6)
    assert comp.choices[0].text == want and comp.usage.completion_tokens == 6


def test_openai_errors_name_the_field(env):
    import openai

    client = openai.OpenAI(base_url=env["router"].http_address + "/v1", api_key="unused", max_retries=0, timeout=30)
    model = env["router"].frontend.model_name
    for kwargs, param in [(dict(temperature=-1), "temperature"), (dict(n=2), "n"), (dict(top_p=5), "top_p"),
                          (dict(max_tokens=100_000), "max_tokens"), (dict(model="nope"), "model")]:
        args = dict(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4) | kwargs
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(**args)
        assert err.value.status_code in (400, 404) and err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[], max_tokens=1, extra_body={"messages": "x"})
    assert err.value.body["param"].startswith("messages")
