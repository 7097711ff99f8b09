"""Sending one prepared request to an engine replica and streaming its deltas back.

The policy picks a replica; if that replica refuses before streaming anything (UNAVAILABLE: dead
or draining; RESOURCE_EXHAUSTED: queue full) the request goes to the next choice among the
replicas not yet tried. If a replica fails under a request (its process or a rank dies, the
engine errors), the request resumes on another replica from its prompt plus the tokens already
streamed: the client sees one stream, no gap, no repeat. Leaving the stream early — the client cancelled, the deadline passed — cancels the
replica call, which aborts the request in the engine and frees its KV. DeepSeek-R1 reasoning is
split from the answer here, so both front ends share it.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc
from grpc import aio

from expertmesh.cluster.wire import FINISH_FROM_PROTO, sampling_to_proto
from expertmesh.cluster.router.reasoning import ReasoningParser
from expertmesh.cluster.router.errors import RouterError
from expertmesh.cluster.router.frontend import PreparedRequest
from expertmesh.cluster.router.policies import RoutingPolicy
from expertmesh.cluster.router.replicas import Admission, Replica, ReplicaSet
from opentelemetry import trace

from expertmesh.v1 import engine_pb2, generate_pb2

log = logging.getLogger(__name__)

RETRY_BEFORE_FIRST_TOKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# A replica failing under a request (process gone, rank dead, engine error): the request resumes
# elsewhere. Anything else (bad input, deadline) is the request's own answer.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED)


def _record_sent(request: engine_pb2.EngineGenerateRequest, msg: engine_pb2.EngineGenerateResponse) -> None:
    """What the client has, so a resume continues right after it."""
    request.resume_token_ids.extend(msg.token_ids)
    request.resume_text_chars += len(msg.text)


def _nothing_left(request: engine_pb2.EngineGenerateRequest) -> bool:
    """Whether the tokens already streamed reach the request's max_tokens (when it set one)."""
    return request.sampling.HasField("max_tokens") and len(request.resume_token_ids) >= request.sampling.max_tokens


def _finished_by_length(request: engine_pb2.EngineGenerateRequest) -> engine_pb2.EngineGenerateResponse:
    """The closing message a replica would have sent at max_tokens, for a stream whose replica
    failed right after its last token (the whole request's usage; no prefix-cache figure)."""
    return engine_pb2.EngineGenerateResponse(
        request_id=request.request_id, finished=True, finish_reason=generate_pb2.FINISH_REASON_LENGTH,
        prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(request.resume_token_ids))


def _without_finish(msg: engine_pb2.EngineGenerateResponse) -> engine_pb2.EngineGenerateResponse:
    out = engine_pb2.EngineGenerateResponse()
    out.CopyFrom(msg)
    out.finished, out.finish_reason, out.error = False, generate_pb2.FINISH_REASON_UNSPECIFIED, ""
    return out


@dataclass
class Delta:
    """One streamed step as both front ends need it."""

    token_ids: list[int]
    text: str  # answer text (all text when reasoning is not split)
    reasoning: str
    logprobs: list[generate_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    replica_id: str = ""


class Dispatcher:
    def __init__(self, replicas: ReplicaSet, policy: RoutingPolicy, max_attempts: int = 3,
                 max_resumes: int = 3, resume_wait_s: float = 60.0) -> None:
        self.replicas = replicas
        self.policy = policy
        self.max_attempts = max_attempts
        self.max_resumes = max_resumes
        self.resume_wait_s = resume_wait_s
        self.failures_total = 0  # replicas that failed under a request
        self.resumed_total = 0  # streams continued on another replica after a failure
        # called with (seconds from the failure to the next replica's first message, tokens resumed)
        self.on_recovery: Callable[[float, int], None] | None = None

    def check_admission(self) -> None:
        """Refuse now, before any work, when every replica is known to be full (replicas.py)."""
        if self.replicas.saturated():
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, "all replicas are at their queue limit; retry later")

    def admit(self) -> Admission | None:
        """The door: None when every replica is known to be full (refuse now, before any work);
        else a ticket holding the request's place until it is sent (pass it to `stream`) or the
        caller releases it."""
        return None if self.replicas.saturated() else self.replicas.admit()

    async def stream(self, prepared: PreparedRequest, request_id: str, timeout: float | None = None,
                     metadata: tuple[tuple[str, str], ...] = (), trace_parent=None,
                     admission: Admission | None = None) -> AsyncIterator[Delta]:
        """Deltas of one request; raises RouterError. `timeout` is the time left for the whole call."""
        parser = ReasoningParser(starts_in_reasoning=prepared.starts_in_reasoning) if prepared.split_reasoning else None
        upstream = self._engine_stream(prepared, request_id, timeout, metadata, trace_parent, admission)
        async with aclosing(upstream):  # closing this stream must cancel the replica call now
            async for msg, replica in upstream:
                text, reasoning = msg.text, ""
                finish = FINISH_FROM_PROTO.get(msg.finish_reason) if msg.finished else None
                if parser is not None:
                    reasoning, text = parser.feed(text)
                    if msg.finished:
                        r, c = parser.finish()
                        reasoning, text = reasoning + r, text + c
                yield Delta(list(msg.token_ids), text, reasoning, list(msg.logprobs), finish,
                            msg.prompt_tokens, msg.completion_tokens, msg.cached_tokens, replica.replica_id)

    async def _engine_stream(self, prepared: PreparedRequest, request_id: str, timeout: float | None,
                             metadata: tuple[tuple[str, str], ...], trace_parent=None,
                             admission: Admission | None = None):
        """The replica's messages for one request, across replicas: a refusal before the first token
        tries the next replica; a replica (or rank) that fails under the request hands it to a healthy
        one, resumed from the prompt plus the tokens already streamed (the replica continues with the
        sampling state of that step, so greedy and seeded streams continue exactly as they would
        have), waiting for a replica to come back within the request's deadline if none is left.
        With an `admission` the door has let the request in already (its place is counted)."""
        if admission is None:
            self.check_admission()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        request = engine_pb2.EngineGenerateRequest(request_id=request_id, prompt_token_ids=prepared.prompt_token_ids,
                                                   sampling=sampling_to_proto(prepared.sampling),
                                                   trace_context=dict(metadata))  # traceparent/tracestate
        request.sampling.top_logprobs = prepared.top_logprobs
        tried: set[str] = set()
        refusals, failures = 0, 0
        failed_at: float | None = None
        last_error: RouterError | None = None
        while True:
            candidates = [r for r in self.replicas.available() if r.replica_id not in tried]
            if not candidates:
                if not failures or refusals >= self.max_attempts:
                    break
                # a replica failed under this request: wait for another (Serve replaces the dead one)
                left = self.resume_wait_s if deadline is None else min(self.resume_wait_s, deadline - loop.time())
                wait_until = loop.time() + max(0.0, left)
                while not candidates and loop.time() < wait_until:
                    await self.replicas.wait_for_change(min(0.5, wait_until - loop.time()))
                    candidates = [r for r in self.replicas.available() if r.replica_id not in tried]
                if not candidates:
                    break
            candidates = self.replicas.with_room(candidates)  # a full replica would only refuse
            with trace.get_tracer("expertmesh.router").start_as_current_span("route", context=trace_parent) as span:
                replica: Replica = self.policy.select(prepared.prompt_token_ids, candidates)  # type: ignore[assignment]
                span.set_attribute("expertmesh.replica_id", replica.replica_id)
                span.set_attribute("expertmesh.policy", type(self.policy).__name__)
                if request.resume_token_ids:
                    span.set_attribute("expertmesh.resumed_tokens", len(request.resume_token_ids))
            tried.add(replica.replica_id)
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before a replica answered")
            call = replica.stub.Generate(request, timeout=left, metadata=(("x-request-id", request_id), *metadata))
            self.replicas.request_started(replica)
            if admission is not None:
                admission.placed()  # now counted in the replica's inflight
            got_any = False
            failure: str | None = None
            freed = True  # whether the replica had taken the request (its end frees a slot)
            try:
                async for msg in call:
                    if msg.finished and msg.finish_reason == generate_pb2.FINISH_REASON_ERROR:
                        failure = f"engine error on {replica.replica_id}: {msg.error}"
                        if msg.token_ids:  # tokens sampled before the error still count
                            yield _without_finish(msg), replica
                            _record_sent(request, msg)
                        break
                    if failed_at is not None:
                        self._recovered(loop.time() - failed_at, len(request.resume_token_ids))
                        failed_at = None
                    got_any = True
                    yield msg, replica
                    _record_sent(request, msg)
                    if msg.finished:  # complete: a replica dying before the stream closes changes nothing
                        return
                if failure is None:
                    return
            except aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
                    # grpc-core's size cap on the replica, not a full queue: no replica takes it
                    raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"request: too large for replica "
                                                                        f"{replica.replica_id} ({details})",
                                      "request") from None
                if code in RETRY_BEFORE_FIRST_TOKEN and not got_any:
                    freed = False
                    if code == grpc.StatusCode.UNAVAILABLE:
                        self.replicas.report_unavailable(replica, details)
                    else:
                        self.replicas.report_saturated(replica)
                    log.info("request %s: replica %s refused (%s: %s); trying another", request_id,
                             replica.replica_id, code.name, details)
                    last_error = RouterError(code, details)
                    refusals += 1
                    if refusals >= self.max_attempts:
                        break
                    continue
                if code not in RESUMABLE:
                    raise RouterError(code, details) from None
                failure = f"replica {replica.replica_id} failed ({code.name}: {details})"
            finally:
                call.cancel()  # no-op when done; otherwise aborts the request on the replica
                self.replicas.request_ended(replica, freed)
            # the replica failed under the request: take it out of rotation, go on elsewhere
            self.replicas.report_unavailable(replica, failure)
            failures += 1
            self.failures_total += 1
            if _nothing_left(request):
                # every token was streamed before the failure (its step's error carried the last
                # one): the request is done; a replica would refuse a resume with nothing to make
                log.warning("request %s: %s after its last token; finished without resuming", request_id, failure)
                yield _finished_by_length(request), replica
                return
            failed_at = loop.time() if failed_at is None else failed_at
            last_error = RouterError(grpc.StatusCode.UNAVAILABLE, f"no healthy replica left for request {request_id} "
                                                                  "after a replica failed under it")
            if failures > self.max_resumes:
                log.error("request %s: giving up after %d replica failures; last: %s", request_id, failures, failure)
                raise RouterError(grpc.StatusCode.UNAVAILABLE, f"the replicas serving this request failed "
                                                               f"{failures} times (request {request_id})")
            if request.resume_token_ids:
                self.resumed_total += 1
            log.warning("request %s: %s; resuming after %d streamed tokens", request_id, failure,
                        len(request.resume_token_ids))
        if last_error is not None:
            if last_error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise RouterError(last_error.code, f"all replicas are at their queue limit ({last_error.message})")
            raise last_error
        raise RouterError(grpc.StatusCode.UNAVAILABLE, "no engine replica available")

    def _recovered(self, seconds: float, resumed_tokens: int) -> None:
        log.info("request recovered on another replica after %.2fs (%d tokens resumed)", seconds, resumed_tokens)
        if self.on_recovery is not None:
            try:
                self.on_recovery(seconds, resumed_tokens)
            except Exception:  # noqa: BLE001 - telemetry never fails a request
                log.exception("on_recovery hook failed")

    async def load(self) -> generate_pb2.GetLoadResponse:
        await self.replicas.probe_all()
        reps = sorted(self.replicas.replicas.values(), key=lambda r: r.replica_id)
        return generate_pb2.GetLoadResponse(replicas=[r.snapshot() for r in reps], policy=self.policy.name)
