"""The engine: requests in, token and text deltas out, one step at a time.

add_request validates and queues; step() asks the scheduler for the next batches, runs them on
every rank through the executor, and turns sampled tokens into deltas (detokenized, stop rules
applied); abort() frees a request's KV at any point. Single-threaded by design: AsyncEngine drives
it from one thread and hands deltas to asyncio.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from expertmesh.actors.model.config import ModelConfig
from expertmesh.actors.model.placement import check_slots
from expertmesh.actors.sampling_params import InvalidRequestError
from expertmesh.actors.step import StepOutput
from expertmesh.actors.worker import WorkerSpec

from .balancing import EplbConfig, redundant_slots, with_balancer
from .detokenizer import IncrementalDetokenizer
from .generation_defaults import GenerationDefaults
from .executor import Executor, GroupFailure, LocalExecutor, PlacementSpec, RayGroupExecutor
from .request import Request, Status
from .scheduler import Scheduler, SchedulerConfig
from .types import EngineRequest, LoadInfo, RequestOutput, TokenLogprob
from ..tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests; callers map this to RESOURCE_EXHAUSTED."""


@dataclass
class EngineConfig:
    checkpoint: str
    dtype: str = "float32"
    ep_size: int = 1
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    progress: bool = False
    device: str = "cpu"  # "cuda" on GPU ranks (each rank actor sees its own GPU as cuda:0)
    # What unset request fields mean: generation_config.json under these overrides
    # (temperature / top_p / top_k), and the cap on an unset max_tokens.
    sampling_overrides: dict = field(default_factory=dict)
    default_max_tokens: int = 32768
    # A rank that dies is replaced in place and the group re-formed (survivors keep weights and KV);
    # off, or when that fails, the engine fails its requests and the replica is replaced whole.
    rebuild_in_place: bool = True
    eplb: EplbConfig = field(default_factory=EplbConfig)  # expert load balancing (balancing.py)
    # FP8 checkpoints: e4m3 weights stay resident, dequantized inside the matmul (actors/model/fp8.py);
    # False dequantizes them to `dtype` at load (twice the weight memory in bf16).
    keep_fp8: bool = True
    # Optional speed mode, off by default: the lm_head in dynamic int8 on CPU (actors/model/int8.py);
    # logits move ~1% relative, so tokens can differ from transformers'.
    int8_lm_head: bool = False
    # CPU bf16: the lm_head's int8 screen for greedy rows (actors/model/greedy_head.py): same tokens
    greedy_head_screen: bool = True
    # Decode steps as captured graphs (actors/decode_graphs.py): auto (CUDA graphs on a GPU), fx, off
    decode_graphs: str = field(default_factory=lambda: os.environ.get("EXPERTMESH_DECODE_GRAPHS", "auto"))


@dataclass
class StepStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    last_step_s: float = 0.0
    last_alltoall_s: float = 0.0
    rebuilds: int = 0  # in-place group rebuilds after a rank failure
    finished: dict[str, int] = field(default_factory=dict)  # finish_reason → count


class Engine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None, tokenizer=None,
                 placement: PlacementSpec | None = None, group_name: str | None = None,
                 collective_timeout_s: float = 60.0):
        self.config = config
        self.model_config = ModelConfig.from_dir(config.checkpoint)
        if self.model_config.n_routed_experts % config.ep_size and not redundant_slots(config.eplb, config.ep_size):
            raise ValueError(f"ep_size={config.ep_size} must divide n_routed_experts={self.model_config.n_routed_experts}")
        check_slots(self.model_config.n_routed_experts, redundant_slots(config.eplb, config.ep_size), config.ep_size)
        self.kv_buffer_slots = Scheduler.buffer_slots_for(config.scheduler)
        self.generation_defaults = GenerationDefaults.load(config.checkpoint, config.sampling_overrides)
        # The tokenizer and SGLang's radix cache take seconds to import; the rank actors take
        # seconds to start. Overlap them: the actors start while this thread loads the rest.
        with ThreadPoolExecutor(1, thread_name_prefix="engine-init") as pool:
            rest = pool.submit(lambda: (tokenizer or load_tokenizer(config.checkpoint),
                                        Scheduler(config.scheduler, config.ep_size)))
            if executor is None:
                if config.ep_size == 1 and placement is None:
                    executor = LocalExecutor(self.worker_spec(0))
                else:
                    executor = RayGroupExecutor(self.worker_spec(0), placement or PlacementSpec(), group_name,
                                                collective_timeout_s=collective_timeout_s)
            self.tokenizer, self.scheduler = rest.result()
        assert self.scheduler.kv_buffer_slots == self.kv_buffer_slots
        self.executor = with_balancer(executor, config.eplb, self.model_config, config.ep_size)
        self.requests: dict[str, Request] = {}
        self.stats = StepStats()
        self.model_name = Path(config.checkpoint).name

    def worker_spec(self, rank: int) -> WorkerSpec:
        return WorkerSpec(checkpoint=str(self.config.checkpoint), dtype=self.config.dtype,
                          kv_slots=self.kv_buffer_slots, ep_rank=rank, ep_size=self.config.ep_size,
                          progress=self.config.progress, seed=self.config.seed, device=self.config.device,
                          redundant_experts=redundant_slots(self.config.eplb, self.config.ep_size),
                          keep_fp8=self.config.keep_fp8, int8_lm_head=self.config.int8_lm_head,
                          greedy_head_screen=self.config.greedy_head_screen, decode_graphs=self.config.decode_graphs)

    @property
    def max_sequence_tokens(self) -> int:
        """Prompt + max_tokens one request may need: the context, or what one rank's pool holds alone."""
        pool = self.scheduler.capacity_tokens() - self.config.scheduler.page_size  # lifetime_slots' slack page
        return min(self.model_config.max_position_embeddings, pool)

    # -- requests -----------------------------------------------------------------------------
    def validate(self, req: EngineRequest) -> None:
        params = req.sampling.validate()
        ctx = self.model_config.max_position_embeddings
        n = len(req.prompt_token_ids)
        if len(req.resume_token_ids) >= params.max_tokens:
            raise InvalidRequestError("resume_token_ids", f"{len(req.resume_token_ids)} tokens already produced "
                                                          f"leave nothing of max_tokens ({params.max_tokens})")
        if n == 0:
            raise InvalidRequestError("prompt", "must not be empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in (*req.prompt_token_ids, *req.resume_token_ids) if not (0 <= int(t) < vocab)]
        if bad:
            raise InvalidRequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if n >= ctx:
            raise InvalidRequestError("prompt", f"{n} tokens is longer than the model's context of {ctx} tokens")
        if n + params.max_tokens > ctx:
            raise InvalidRequestError("max_tokens", f"prompt ({n}) + max_tokens ({params.max_tokens}) exceeds "
                                                    f"the model's context of {ctx} tokens")
        need = self.scheduler.lifetime_slots(n, params.max_tokens)
        if need > self.scheduler.capacity_tokens():
            raise InvalidRequestError("max_tokens", f"prompt ({n}) + max_tokens ({params.max_tokens}) needs {need} "
                                                    f"KV slots; a rank holds {self.scheduler.capacity_tokens()}")
        if req.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already in flight")

    def add_request(self, req: EngineRequest) -> Request:
        self.validate(req)
        if self.scheduler.queue_full():
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests waiting (max_waiting_requests)")
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.sampling.stop)
        params, resumed = req.sampling, [int(t) for t in req.resume_token_ids]
        if resumed:  # prefill prompt + what was produced; sample on from there, streaming only what is new
            detok.resume(resumed, req.resume_text_chars)
            params = replace(params, max_tokens=params.max_tokens - len(resumed))
        r = Request(req.request_id, [int(t) for t in req.prompt_token_ids] + resumed, params, detok,
                    arrival=req.arrival_time, resumed=len(resumed))
        self.requests[r.request_id] = r
        self.scheduler.add(r)
        return r

    def abort(self, request_id: str) -> RequestOutput | None:
        r = self.requests.get(request_id)
        if r is None:
            return None
        r.finish_reason = "abort"
        self._finish(r, cache_kv=True)
        return self._delta(r)

    def failure(self) -> str | None:
        """Why the rank group cannot step (a rank died or failed and it was not rebuilt), or None;
        None while it is being rebuilt in place (requests wait for it)."""
        if self.rebuilding:
            return None
        return getattr(self.executor, "failed", None) or None

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        if not step.requests:
            return []
        t0 = time.perf_counter()
        try:
            outputs = self.executor.step(step.inputs)
        except GroupFailure as exc:
            log.error("step failed: %s", exc)
            return self._recover(step, str(exc))
        self.stats.last_step_s = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.prefill_tokens += step.prefill_tokens
        self.stats.decode_tokens += step.decode_tokens
        self.stats.last_alltoall_s = max((o.timings.dispatch + o.timings.combine for o in outputs), default=0.0)
        self.last_outputs: list[StepOutput] = outputs
        self.scheduler.advance(step)
        now = time.monotonic()
        touched: list[Request] = []
        for out in outputs:
            for s in out.sampled:
                r = self.scheduler.running.get(s.request_id)
                if r is None:
                    continue
                self._append_token(r, s, now)
                touched.append(r)
        return [self._delta(r) for r in touched]

    def _append_token(self, r: Request, s, now: float) -> None:
        if r.first_token_at is None:
            r.first_token_at = now
            self.stats.prompt_tokens += len(r.prompt)
            self.stats.cached_tokens += r.cached_tokens
        else:
            r.itl_sum += now - (r.last_token_at or now)
        r.last_token_at = now
        r.output.append(s.token_id)
        r.pending_ids.append(s.token_id)
        if s.logprob is not None:
            r.pending_logprobs.append(TokenLogprob(s.token_id, s.logprob, list(s.top_logprobs or [])))
        text, hit_stop = r.detok.add([s.token_id])
        r.pending_text += text
        p = r.params
        if hit_stop:
            r.finish_reason = "stop"
        elif s.token_id in p.stop_token_ids or (not p.ignore_eos and s.token_id == self.model_config.eos_token_id):
            r.finish_reason = "stop"
        elif len(r.output) >= p.max_tokens:
            r.finish_reason = "length"
        if r.finish_reason:
            if not hit_stop:
                r.pending_text += r.detok.flush()
            self._finish(r, cache_kv=True)

    def _finish(self, r: Request, cache_kv: bool) -> None:
        if r.finished:
            return
        self.scheduler.finish(r, cache_kv=cache_kv)
        self.requests.pop(r.request_id, None)
        self.stats.finished[r.finish_reason or "stop"] = self.stats.finished.get(r.finish_reason or "stop", 0) + 1

    def _recover(self, failed, message: str) -> list[RequestOutput]:
        """Rebuild the group in place and resume every running request from its tokens so far;
        if the executor cannot, fail them (the replica then fails as a unit and is replaced)."""
        rebuild = getattr(self.executor, "rebuild", None)
        if rebuild is None or not self.config.rebuild_in_place:
            return self._fail_all(message)
        t0 = time.perf_counter()
        try:
            lost = rebuild()
        except GroupFailure as exc:
            log.error("in-place rebuild failed: %s", exc)
            return self._fail_all(f"{message}; {exc}")
        n = self.scheduler.requeue_after_failure(failed, lost)
        self.stats.rebuilds += 1
        log.warning("group rebuilt in %.1fs (rank(s) %s replaced); %d running request(s) resume",
                    time.perf_counter() - t0, lost, n)
        return []

    @property
    def rebuilding(self) -> bool:
        return bool(getattr(self.executor, "rebuilding", False))

    def _fail_all(self, message: str) -> list[RequestOutput]:
        outs = []
        for r in list(self.scheduler.running.values()):
            r.finish_reason, r.error = "error", message
            self._finish(r, cache_kv=False)
            outs.append(self._delta(r))
        return outs

    def _delta(self, r: Request) -> RequestOutput:
        out = RequestOutput(
            request_id=r.request_id, token_ids=r.pending_ids, text=r.pending_text, finished=r.finished,
            finish_reason=r.finish_reason if r.finished else None, prompt_tokens=len(r.prompt) - r.resumed,
            completion_tokens=r.resumed + len(r.output), cached_tokens=r.cached_tokens,  # the whole request's usage
            logprobs=r.pending_logprobs or None, error=r.error,
            metrics=r.metrics() if r.finished or (r.pending_ids and len(r.output) == len(r.pending_ids)) else None,
        )
        r.pending_ids, r.pending_text, r.pending_logprobs = [], "", []
        return out

    # -- numbers ----------------------------------------------------------------------------------
    def load(self) -> LoadInfo:
        s = self.stats
        return LoadInfo(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_used_tokens=self.scheduler.kv_used(), kv_total_tokens=self.scheduler.kv_total(),
            cache_hit_rate=s.cached_tokens / s.prompt_tokens if s.prompt_tokens else 0.0,
            prompt_tokens_total=s.prompt_tokens, cached_tokens_total=s.cached_tokens,
            kv_reserved_tokens=self.scheduler.kv_reserved(),
            retractions_total=self.scheduler.admission_stats.retractions,
            recomputed_tokens_total=self.scheduler.admission_stats.recomputed_tokens,
            admission=self.scheduler.config.admission,
            group_state="rebuilding" if self.rebuilding else ("failed" if self.failure() else "ok"),
            group_rebuilds_total=self.stats.rebuilds,
        )

    def kv_free_slots(self) -> int:
        return sum(c.available_slots for c in self.scheduler.caches)

    def kv_total_slots(self) -> int:
        return self.scheduler.kv_total()

    def flush_cache(self) -> int:
        return sum(c.flush() for c in self.scheduler.caches)

    def run_to_completion(self, requests: list[EngineRequest]) -> dict[str, RequestOutput]:
        """Adds the requests and steps until all finish; returns each one's merged output."""
        merged: dict[str, RequestOutput] = {}
        for req in requests:
            self.add_request(req)
            merged[req.request_id] = RequestOutput(req.request_id)
        while self.has_work():
            for d in self.step():
                _merge(merged[d.request_id], d)
        return merged

    def shutdown(self) -> None:
        self.executor.shutdown()


def _merge(acc: RequestOutput, d: RequestOutput) -> None:
    acc.token_ids += d.token_ids
    acc.text += d.text
    if d.logprobs:
        acc.logprobs = (acc.logprobs or []) + d.logprobs
    for k in ("finished", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "error", "metrics"):
        v = getattr(d, k)
        if v is not None:
            setattr(acc, k, v)
