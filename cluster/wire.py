"""The router↔replica wire: every conversion between the expertmesh.v1 protos and the Python
types on either side (sampling parameters, streamed outputs, finish reasons, load). The router and
the replica both import this module and nothing else converts; it imports only the generated
stubs and the torch-free SamplingParams, so the router stays light.

Sampling is validated here, once per edge a request enters through: the router's public API, or a
replica's own EngineService (which is reachable on its own, so it checks too).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from expertmesh.actors.sampling_params import InvalidRequestError, SamplingParams
from expertmesh.v1 import engine_pb2, generate_pb2

if TYPE_CHECKING:  # engine-side types, read by attribute only: importing them would load the engine
    from expertmesh.cluster.engine.types import LoadInfo, RequestOutput

FINISH_TO_PROTO = {
    None: generate_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
    "error": generate_pb2.FINISH_REASON_ERROR,
}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}

_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                      "repetition_penalty", "presence_penalty", "frequency_penalty")


def sampling_from_proto(msg: generate_pb2.SamplingParams, defaults: SamplingParams | None = None,
                        prefix: str = "") -> SamplingParams:
    """Unset fields keep `defaults`; raises InvalidRequestError naming `prefix + field`."""
    sp = SamplingParams(**vars(defaults)) if defaults is not None else SamplingParams()
    for name in _OPTIONAL_SAMPLING:
        if msg.HasField(name):
            setattr(sp, name, getattr(msg, name))
    sp.stop = list(msg.stop) or list(sp.stop)
    sp.stop_token_ids = list(msg.stop_token_ids) or list(sp.stop_token_ids)
    sp.ignore_eos = msg.ignore_eos or sp.ignore_eos
    if msg.top_logprobs and not msg.return_logprobs:
        raise InvalidRequestError(prefix + "top_logprobs", "needs return_logprobs set")
    sp.logprobs = (msg.top_logprobs or 1) if msg.return_logprobs else 0
    try:
        return sp.validate()
    except InvalidRequestError as exc:
        name = "top_logprobs" if exc.field == "logprobs" else exc.field
        raise InvalidRequestError(prefix + name, str(exc).split(": ", 1)[-1]) from None


def sampling_to_proto(sp: SamplingParams) -> generate_pb2.SamplingParams:
    msg = generate_pb2.SamplingParams(
        max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
        min_p=sp.min_p, repetition_penalty=sp.repetition_penalty, presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty, stop=sp.stop, stop_token_ids=sp.stop_token_ids,
        ignore_eos=sp.ignore_eos, return_logprobs=sp.logprobs > 0, top_logprobs=sp.logprobs,
    )
    if sp.seed is not None:
        msg.seed = sp.seed
    return msg


def output_to_proto(out: RequestOutput, top_logprobs: int = 0) -> engine_pb2.EngineGenerateResponse:
    msg = engine_pb2.EngineGenerateResponse(
        request_id=out.request_id, token_ids=out.token_ids, text=out.text, finished=out.finished,
        finish_reason=FINISH_TO_PROTO.get(out.finish_reason, generate_pb2.FINISH_REASON_ERROR),
        prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
        cached_tokens=out.cached_tokens, error=out.error or "",
    )
    for lp in out.logprobs or ():  # the engine samples >= 1 alternative; send what was asked
        msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                         top=[generate_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top[:top_logprobs]])
    return msg


def load_to_proto(load: LoadInfo, max_waiting: int = 0, healthy: bool = True,
                  max_running: int = 0) -> generate_pb2.ReplicaLoad:
    return generate_pb2.ReplicaLoad(
        replica_id=load.replica_id, healthy=healthy, running=load.running, waiting=load.waiting,
        kv_used_tokens=load.kv_used_tokens, kv_total_tokens=load.kv_total_tokens, kv_usage=load.kv_usage,
        cache_hit_rate=load.cache_hit_rate, prompt_tokens_total=load.prompt_tokens_total,
        cached_tokens_total=load.cached_tokens_total, max_waiting=max_waiting,
        kv_reserved_tokens=load.kv_reserved_tokens, retractions_total=load.retractions_total,
        recomputed_tokens_total=load.recomputed_tokens_total, admission=load.admission,
        group_state=load.group_state, group_rebuilds_total=load.group_rebuilds_total, max_running=max_running,
    )
