"""The asyncio face of the engine: one background thread steps the Engine; callers await deltas.

Adds and aborts are queued and applied between steps, so the Engine itself stays single-threaded.
Leaving a `generate` iterator early (client cancelled, deadline passed) aborts the request and
frees its KV.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable

from .engine import Engine, QueueFullError
from .types import EngineRequest, LoadInfo, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: Callable[[Engine, list[RequestOutput]], None] | None = None,
                 tracer=None, trace_decode_every: int = 16):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.model_config = engine.model_config
        self.on_step = on_step  # telemetry hook, called on the engine thread after each step
        self.tracer = tracer  # OpenTelemetry tracer: engine-side spans for requests carrying a trace context
        self.trace_decode_every = trace_decode_every
        self._lock = threading.Lock()
        self._adds: deque[tuple[EngineRequest, asyncio.AbstractEventLoop, asyncio.Queue]] = deque()
        self._aborts: deque[str] = deque()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="expertmesh-engine", daemon=True)
        self._thread.start()

    # -- caller side ------------------------------------------------------------------------------
    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.engine.validate(req)  # raises InvalidRequestError before anything is queued
        if self._draining:
            raise QueueFullError("replica is draining")
        if self.engine.scheduler.queue_full(pending=len(self._adds)):
            raise QueueFullError("waiting queue is full")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[req.request_id] = (loop, queue)
            self._adds.append((req, loop, queue))
        self._wake.set()
        trace = self._trace(req)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if trace is not None:
                    m = item.metrics
                    trace.on_delta(len(item.token_ids), m.queue_time_s if m else None, item.cached_tokens,
                                   item.prompt_tokens)
                    if item.finished:
                        trace.finish(item.finish_reason, item.completion_tokens)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._abort_nowait(req.request_id)
                if trace is not None:
                    trace.finish("abort", 0)

    def _trace(self, req: EngineRequest):
        if self.tracer is None or not req.trace_context:
            return None
        from expertmesh.cluster.telemetry.tracing import RequestTrace, context_from_metadata

        trace = RequestTrace(self.tracer, context_from_metadata(req.trace_context.items()), req.request_id,
                             self.trace_decode_every, arrival=req.arrival_time)
        trace.start()
        return trace

    async def abort(self, request_id: str) -> None:
        self._abort_nowait(request_id)

    def _abort_nowait(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def failure(self) -> str | None:
        return self.engine.failure()

    def load(self) -> LoadInfo:
        info = self.engine.load()
        info.waiting += len(self._adds)
        return info

    def kv_free_slots(self) -> int:
        return self.engine.kv_free_slots()

    def kv_total_slots(self) -> int:
        return self.engine.kv_total_slots()

    def in_flight(self) -> int:
        return len(self._queues)

    def drain(self) -> None:
        """Stop taking new requests; running ones finish."""
        self._draining = True

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # -- engine thread ------------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is None:
            return
        loop, queue = entry
        if isinstance(item, BaseException) or item.finished:
            self._queues.pop(rid, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone
            self._queues.pop(rid, None)

    def _apply_pending(self) -> None:
        with self._lock:
            adds, self._adds = list(self._adds), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for req, _loop, _queue in adds:
            try:
                self.engine.add_request(req)
            except Exception as exc:  # validation raced with a change; report to the caller
                self._deliver(req.request_id, exc)
        for rid in aborts:
            out = self.engine.abort(rid)
            if out is not None:
                self._deliver(rid, out)
            else:
                self._queues.pop(rid, None)

    def _run(self) -> None:
        while not self._stopped:
            self._apply_pending()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as exc:  # never let the loop die silently
                log.exception("engine step crashed")
                for rid in list(self._queues):
                    self._deliver(rid, RuntimeError(f"engine step failed: {exc}"))
                    self.engine.abort(rid)
                time.sleep(0.1)
                continue
            for out in outs:
                self._deliver(out.request_id, out)
            if self.on_step is not None:
                try:
                    self.on_step(self.engine, outs)
                except Exception:
                    log.exception("on_step hook failed")
