"""Issue 16: what unset fields mean. max_tokens: the rest of the context (capped by
scheduler.default_max_tokens), not 128; temperature / top_p / top_k: the checkpoint's
generation_config.json (the generator writes R1's 0.6 / 0.95), under the config's overrides.
Checked through the real router with the real clients (grpcio, the openai package)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _router_env import LoopThread, start_replica, start_router
from expertmesh.actors.sampling_params import InvalidRequestError, SamplingParams
from expertmesh.cluster.engine.generation_defaults import GenerationDefaults
from expertmesh.cluster.router.client import GenerationClient

DEFAULT_MAX = 200  # > 128 (the old default), small enough for CI


def test_defaults_come_from_generation_config_then_overrides(tiny_ckpt, tmp_path):
    gd = GenerationDefaults.load(tiny_ckpt)
    assert (gd.temperature, gd.top_p, gd.top_k) == (0.6, 0.95, None)
    assert gd.apply(SamplingParams()).temperature == 0.6
    over = GenerationDefaults.load(tiny_ckpt, {"temperature": 0.3, "top_k": 40})
    assert (over.temperature, over.top_p, over.top_k) == (0.3, 0.95, 40)
    assert GenerationDefaults.load(tmp_path).set_fields() == {}  # no file: the built-in defaults
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_k": 0}))
    assert GenerationDefaults.load(tmp_path).set_fields() == {"temperature": 0.0, "top_k": -1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 7.0}))
    with pytest.raises(InvalidRequestError, match="temperature"):
        GenerationDefaults.load(tmp_path)


@pytest.fixture(scope="module")
def env(tiny_ckpt: Path):
    import torch

    from expertmesh.cluster.engine.async_engine import AsyncEngine
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    torch.set_num_threads(1)
    lt = LoopThread()
    engine = AsyncEngine(Engine(EngineConfig(str(tiny_ckpt), scheduler=SchedulerConfig(kv_tokens_per_rank=4096),
                                             default_max_tokens=DEFAULT_MAX)))
    replica = start_replica(lt, engine, tiny_ckpt, replica_id="d0")
    router = start_router(lt, [f"d0={replica.address}"], http_port=0)
    yield dict(lt=lt, engine=engine, router=router)
    lt.run(router.stop(0))
    lt.run(replica.stop(0))
    engine.shutdown()
    lt.close()


def test_model_info_and_models_report_the_defaults(env):
    import httpx2 as httpx

    with GenerationClient(env["router"].grpc_address) as c:
        info = c.model_info()
    assert info.default_sampling.temperature == pytest.approx(0.6)
    assert info.default_sampling.top_p == pytest.approx(0.95)
    assert not info.default_sampling.HasField("top_k")
    assert info.default_max_tokens == DEFAULT_MAX and 0 < info.max_sequence_tokens <= info.max_context_length
    card = httpx.get(env["router"].http_address + "/v1/models", timeout=10).json()["data"][0]
    assert card["default_sampling"]["temperature"] == pytest.approx(0.6)
    assert str(DEFAULT_MAX) in card["default_sampling"]["max_tokens"]


def test_unset_max_tokens_generates_past_128_on_both_apis(env):
    import openai

    messages = [{"role": "user", "content": "Think step by step about routers."}]
    with GenerationClient(env["router"].grpc_address) as c:
        done = c.chat_complete(messages, temperature=0, ignore_eos=True)
    assert done.finish_reason == "length" and done.usage["completion_tokens"] == DEFAULT_MAX

    client = openai.OpenAI(base_url=env["router"].http_address + "/v1", api_key="unused", max_retries=0, timeout=60)
    chat = client.chat.completions.create(model="", messages=messages, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == DEFAULT_MAX
    text = client.completions.create(model="", prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == 16  # OpenAI's documented default for legacy completions


def test_unset_temperature_samples_at_the_checkpoints_0_6(env):
    """A seeded request without temperature equals the same request asking for 0.6 / 0.95
    explicitly, and differs from one asking for 1.0."""
    def run(**kw) -> list[int]:
        with GenerationClient(env["router"].grpc_address) as c:
            return c.complete([0, 11, 22, 33], max_tokens=24, seed=1234, ignore_eos=True, **kw).token_ids

    unset = run()
    assert unset == run(temperature=0.6, top_p=0.95)
    assert unset != run(temperature=1.0, top_p=1.0)
    assert unset != run(temperature=0.0)


def test_checkpoint_without_generation_config_keeps_built_in_defaults(tiny_ckpt, tmp_path):
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.grpc_service import model_info_from_engine

    plain = tmp_path / "plain"
    shutil.copytree(tiny_ckpt, plain)
    (plain / "generation_config.json").unlink()
    e = Engine(EngineConfig(str(plain), sampling_overrides={"top_k": 20}))
    try:
        info = model_info_from_engine(e)
        assert info.default_sampling.top_k == 20 and not info.default_sampling.HasField("temperature")
    finally:
        e.shutdown()
