"""The scheduler: which requests run this step, on which data-parallel rank, with which KV slots.

Continuous batching: every step carries one decode token per running request plus prefill chunks
of admitted requests, under a per-rank token budget.

Admission, two policies (`admission`):
- "use" (default): admit while the pool holds what running requests hold now plus an estimate of
  their growth (remaining max_tokens × a new-token ratio that decays step by step, SGLang's
  scheme) and a headroom. When a decode step finds the pool short, the latest admitted requests
  are retracted: their KV goes into the radix cache (reused if still there on readmission), and
  they requeue at the front as resumed requests (prompt + output so far, same sampling state), so
  they finish with exactly the tokens they would have produced. Reasoning models stop long
  before max_tokens; reserving max_tokens would leave most of the pool empty.
- "lifetime": reserve each request's whole life (uncached prompt + max_tokens) at admission;
  nothing is ever retracted, at the price of admitting far fewer long-max_tokens requests.
Evictable cached prefixes count as free in both.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Literal

import torch

from expertmesh.actors.step import NewRequest, SeqWork, StepInput

from .prefix_cache import PrefixCache
from .request import Request, Status

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    kv_tokens_per_rank: int = 8192
    page_size: int = 16
    prefix_cache: bool = True
    max_running_requests: int = 64  # per rank
    max_batch_tokens: int = 2048  # per rank per step
    chunked_prefill_tokens: int = 512
    max_waiting_requests: int = 1024
    admission: Literal["use", "lifetime"] = "use"
    # "use" admission: expected growth of a running request = remaining max_tokens × ratio (at
    # most estimate_clip_tokens); the ratio starts at init, decays linearly to min over
    # ratio_decay_steps decode steps, and jumps back up after a retraction.
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    ratio_decay_steps: int = 600
    estimate_clip_tokens: int = 4096
    headroom_tokens: int = 0  # extra free KV per rank admission keeps (on top of a page per request)
    retract_decode_steps: int = 20  # after a retraction, assume each request decodes this many more

    def __post_init__(self) -> None:
        if self.admission not in ("use", "lifetime"):
            raise ValueError(f"admission must be 'use' or 'lifetime', got {self.admission!r}")
        if not 0.0 <= self.min_new_token_ratio <= self.init_new_token_ratio <= 1.0:
            raise ValueError("need 0 <= min_new_token_ratio <= init_new_token_ratio <= 1")


@dataclass
class AdmissionStats:
    retractions: int = 0  # requests retracted (each time)
    recomputed_tokens: int = 0  # context tokens prefilled again after a retraction (radix misses)
    peak_running: int = 0


@dataclass
class ScheduledStep:
    inputs: list[StepInput]  # one per rank
    requests: list[Request]  # the requests in this step's batches
    prefill_tokens: int = 0
    decode_tokens: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, ep_size: int):
        self.config = config
        self.ep_size = ep_size
        self.caches = [PrefixCache(config.kv_tokens_per_rank, config.page_size, config.prefix_cache)
                       for _ in range(ep_size)]
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # insertion-ordered: admission order
        self._released: list[list[str]] = [[] for _ in range(ep_size)]
        self._remaps: list[dict[str, list[int]]] = [{} for _ in range(ep_size)]
        self.reserved = [0] * ep_size  # KV slots promised to admitted requests but not allocated yet
        self.new_token_ratio = config.init_new_token_ratio
        self._growth = [0] * ep_size  # per-rank expected growth during one schedule() (admission by use)
        self.admission_stats = AdmissionStats()

    # -- sizes --------------------------------------------------------------------------------
    @staticmethod
    def buffer_slots_for(config: SchedulerConfig) -> int:
        """Rows a rank's KV buffer needs (whole pages, plus the reserved page 0), known before
        the radix cache exists."""
        p = config.page_size
        return config.kv_tokens_per_rank // p * p + p

    @property
    def kv_buffer_slots(self) -> int:
        return self.caches[0].buffer_slots

    def capacity_tokens(self) -> int:
        return self.caches[0].total_slots

    def _pages(self, n: int) -> int:
        p = self.config.page_size
        return -(-n // p) * p

    def lifetime_slots(self, prompt_len: int, max_tokens: int) -> int:
        """Slots a request may hold at most: every context token but the last sampled one, plus a page of slack."""
        return self._pages(prompt_len + max_tokens) + self.config.page_size

    # -- queue ----------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def queue_full(self, pending: int = 0) -> bool:
        """Whether `pending` more requests (plus those waiting) would overflow the waiting queue.
        Requests that free running slots will take at the next step do not count as queued: a
        burst is admitted up to max_running_requests (per rank: times ep_size) before anything is
        refused. Routers read the same sum from GetLoad (max_running + max_waiting) and refuse at
        their door once they have that many here."""
        free = max(0, self.config.max_running_requests * self.ep_size - len(self.running))
        return len(self.waiting) + pending - free >= self.config.max_waiting_requests

    def remove_waiting(self, req: Request) -> bool:
        try:
            self.waiting.remove(req)
            return True
        except ValueError:
            return False

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        inputs = [StepInput(released=self._released[r], remap=self._remaps[r]) for r in range(self.ep_size)]
        self._released = [[] for _ in range(self.ep_size)]
        self._remaps = [{} for _ in range(self.ep_size)]
        budget = [self.config.max_batch_tokens] * self.ep_size
        chosen: list[Request] = []
        step = ScheduledStep(inputs, chosen)

        blocked: set[int] = set()
        if self.config.admission == "use":
            self._decay_ratio()
            for rank in range(self.ep_size):
                if self._make_room_for_decode(rank, inputs[rank]):
                    blocked.add(rank)  # just retracted: admit nothing new there this step

        # decode first: one token per running request that has sampled one
        for req in self.running.values():
            if req.prefilling or not req.output:
                continue
            slot = self._alloc(req, 1)
            inputs[req.rank].seqs.append(SeqWork(req.request_id, [req.output[-1]], slot, sample=True))
            budget[req.rank] -= 1
            step.decode_tokens += 1
            chosen.append(req)

        # continue prefills already under way, then admit new requests (FCFS per rank)
        for req in self.running.values():
            if req.prefilling and budget[req.rank] > 0:
                step.prefill_tokens += self._prefill_chunk(req, inputs[req.rank], budget)
                chosen.append(req)
        # admission by use: each rank's expected growth, summed once per step, not per candidate
        self._growth = ([self.estimated_growth(r) for r in range(self.ep_size)]
                        if self.config.admission == "use" and self.waiting else [0] * self.ep_size)
        for req in list(self.waiting):
            if len(blocked) == self.ep_size:
                break
            if self._shares_a_prefill(req):
                continue  # wait for that prefill to land in the radix cache, then reuse it
            rank, match = self._choose_rank(req, blocked)
            if rank is None:
                continue
            if not self._admit(req, rank, match, budget):
                blocked.add(rank)
                continue
            step.prefill_tokens += self._prefill_chunk(req, inputs[rank], budget)
            chosen.append(req)
        self.admission_stats.peak_running = max(self.admission_stats.peak_running, len(self.running))
        return step

    # -- admission by use -------------------------------------------------------------------------
    def _decay_ratio(self) -> None:
        cfg = self.config
        step = (cfg.init_new_token_ratio - cfg.min_new_token_ratio) / max(1, cfg.ratio_decay_steps)
        self.new_token_ratio = max(cfg.min_new_token_ratio, self.new_token_ratio - step)

    def expected_growth(self, req: Request) -> int:
        """KV slots `req` is expected to take from now on (admission's estimate, not a promise)."""
        left = max(0, req.params.max_tokens - len(req.output))
        return min(self.config.estimate_clip_tokens, int(left * self.new_token_ratio + 0.999))

    def estimated_growth(self, rank: int | None = None) -> int:
        return sum(self.expected_growth(r) for r in self.running.values() if rank is None or r.rank == rank)

    def _decode_pages_needed(self, rank: int) -> int:
        """Slots the next decode step on `rank` must allocate: a new page for each decoding
        request whose last page is full."""
        p = self.config.page_size
        return sum(p for r in self.running.values()
                   if r.rank == rank and not r.prefilling and r.output and len(r.slots) % p == 0)

    def _make_room_for_decode(self, rank: int, inp: StepInput) -> bool:
        """Retract the latest admitted requests on `rank` until every decode fits. True if any was."""
        cache = self.caches[rank]
        retracted = False
        while self._decode_pages_needed(rank) > cache.available_slots + cache.evictable_tokens:
            here = [r for r in self.running.values() if r.rank == rank]
            if len(here) <= 1:  # validate() refused requests that cannot fit alone: cannot happen
                raise RuntimeError(f"KV pool of rank {rank} too small for one request")
            victim = max(here, key=lambda r: (r.admitted_at or 0.0, -len(r.output)))
            self.retract(victim, inp)
            retracted = True
        if retracted:
            self._raise_ratio()
        return retracted

    def _raise_ratio(self) -> None:
        """After a retraction the estimate was too low: SGLang's reset, from what running requests
        decoded so far plus a margin, over what they may still decode."""
        decoded = sum(len(r.output) + r.resumed for r in self.running.values())
        total = sum(r.params.max_tokens + r.resumed for r in self.running.values())
        margin = self.config.retract_decode_steps * len(self.running)
        if total:
            self.new_token_ratio = max(self.new_token_ratio, min(1.0, (decoded + margin) / total))

    def requeue_after_failure(self, failed: ScheduledStep, lost_ranks: list[int]) -> int:
        """After a failed step and an in-place rebuild: every running request is retracted and
        resumes from prompt + output (token-exact, as after a pool shortage). On a surviving rank
        its KV stays in the radix cache, so it recomputes almost nothing; a replaced rank's cache
        starts empty. The failed step's releases are sent again. Returns the requests requeued."""
        for rank, inp in enumerate(failed.inputs):
            self._released[rank] = inp.released + self._released[rank]
        requeued = list(self.running.values())
        for req in reversed(requeued):  # appendleft: keep their admission order at the queue's front
            inp, rank = StepInput(), req.rank
            self.retract(req, inp, pool_short=False)
            self._released[rank] += inp.released
        for rank in lost_ranks:
            self.caches[rank] = PrefixCache(self.config.kv_tokens_per_rank, self.config.page_size,
                                            self.config.prefix_cache)
            self.reserved[rank] = 0
            self._released[rank] = []
            self._remaps[rank] = {}
        return len(requeued)

    def retract(self, req: Request, inp: StepInput, pool_short: bool = True) -> None:
        """Free a running request's KV (cached in the radix tree) and requeue it first, to resume
        from prompt + output so far: the rank's sampling state is rebuilt from those tokens."""
        cache, rank = self.caches[req.rank], req.rank
        self.running.pop(req.request_id)
        self.reserved[req.rank] -= req.reserved
        req.reserved = 0
        cache.cache_request(req.context_tokens(), req.slots, req.handle, finished=True)
        if req.announced:
            inp.released.append(req.request_id)
            inp.remap.pop(req.request_id, None)
        log.info("retracted %s from rank %d after %d tokens (%s)", req.request_id, rank, len(req.output),
                 "pool short" if pool_short else "group rebuilt")
        req.prompt = req.prompt + req.output
        req.resumed += len(req.output)
        req.params = replace(req.params, max_tokens=req.params.max_tokens - len(req.output))
        req.output = []
        req.rank, req.handle, req.slots = -1, None, torch.empty(0, dtype=torch.long)
        req.computed = 0
        req.announced = False
        req.retractions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        if pool_short:
            self.admission_stats.retractions += 1

    def _shares_a_prefill(self, req: Request) -> bool:
        """In-batch prefix sharing: a request whose prompt shares at least a page of not-yet-cached
        tokens with a prompt still being prefilled waits a few steps, until _share_prompt has put
        that prompt into the radix cache, instead of computing the same prefix a second time."""
        if not self.config.prefix_cache:
            return False
        page = self.config.page_size
        for other in self.running.values():
            if not other.prefilling:
                continue
            # a page past what `other` found cached is shared iff that many leading tokens are
            # equal: one list comparison in C, not a Python loop over a long prompt per step
            n = other.cached_tokens + page
            if n <= min(len(req.prompt) - 1, len(other.prompt)) and req.prompt[:n] == other.prompt[:n]:
                return True
        return False

    def _choose_rank(self, req: Request, blocked: set[int]):
        """The rank holding the longest cached prefix; ties go to the least busy rank."""
        best = None
        for rank, cache in enumerate(self.caches):
            if rank in blocked:
                continue
            match = cache.match(req.prompt[:-1])
            load = sum(1 for r in self.running.values() if r.rank == rank)
            key = (match.length, -load, -rank)
            if best is None or key > best[0]:
                best = (key, rank, match)
        return (None, None) if best is None else (best[1], best[2])

    def _admit(self, req: Request, rank: int, match, budget: list[int]) -> bool:
        cfg = self.config
        running_here = sum(1 for r in self.running.values() if r.rank == rank)
        if running_here >= cfg.max_running_requests or budget[rank] <= 0:
            return False
        cache = self.caches[rank]
        uncached = len(req.prompt) - match.length
        if cfg.admission == "lifetime":
            need = self.lifetime_slots(len(req.prompt), req.params.max_tokens) - match.length
            reserve = need - uncached
        else:  # what it holds now, its expected growth, and a page of slack per running request
            need = (self._pages(len(req.prompt)) - match.length + self.expected_growth(req)
                    + self._growth[rank] + cfg.page_size * (running_here + 1) + cfg.headroom_tokens)
            reserve = 0
        cache.lock(match.handle)
        free = cache.available_slots + cache.evictable_tokens - self.reserved[rank]
        if free < need:
            cache.unlock(match.handle)
            return False
        own = cache.alloc_for(match.slots, uncached)
        if own is None:  # eviction could not free enough after all
            cache.unlock(match.handle)
            return False
        req.rank, req.handle = rank, match.handle
        req.slots = torch.cat([match.slots, own])
        if req.retractions:
            self.admission_stats.recomputed_tokens += uncached
        else:  # usage reports the first admission's hit; later hits are our own retracted KV
            req.cached_tokens = match.length
        req.computed = match.length
        req.reserved = reserve
        if cfg.admission == "use":
            self._growth[rank] += self.expected_growth(req)
        self.reserved[rank] += req.reserved
        req.status = Status.RUNNING
        req.admitted_at = time.monotonic()
        # out of the queue before it counts as running: queue_full(), read from the serving thread
        # while this runs, must never count a request twice (it refused bursts below the limit)
        self.waiting.remove(req)
        self.running[req.request_id] = req
        return True

    def _prefill_chunk(self, req: Request, inp: StepInput, budget: list[int]) -> int:
        n = min(req.remaining_prompt, budget[req.rank], self.config.chunked_prefill_tokens)
        if n <= 0:
            return 0
        if not req.announced:
            inp.new_requests.append(NewRequest(req.request_id, req.prompt, req.params,
                                               req.slots[: req.computed].tolist(), req.resumed))
            req.announced = True
        a, b = req.computed, req.computed + n
        last = b == len(req.prompt)
        inp.seqs.append(SeqWork(req.request_id, req.prompt[a:b], req.slots[a:b].tolist(), sample=last))
        budget[req.rank] -= n
        return n

    def _alloc(self, req: Request, n: int) -> list[int]:
        cache = self.caches[req.rank]
        new = cache.alloc_for(req.slots, n)
        if new is None:  # admission reserved / _make_room_for_decode freed this: a bookkeeping bug
            raise RuntimeError(f"KV reservation violated for {req.request_id} on rank {req.rank}")
        self.reserved[req.rank] -= n
        req.reserved -= n
        req.slots = torch.cat([req.slots, new])
        return new.tolist()

    # -- after the step ---------------------------------------------------------------------------
    def advance(self, step: ScheduledStep) -> None:
        """Mark this step's tokens computed; share finished prompts with later requests."""
        for inp in step.inputs:
            for seq in inp.seqs:
                req = self.running.get(seq.request_id)
                if req is None:
                    continue
                was_prefilling = req.prefilling
                req.computed += len(seq.token_ids)
                if was_prefilling and not req.prefilling:
                    self._share_prompt(req)

    def _share_prompt(self, req: Request) -> None:
        """Insert a just-prefilled prompt into the radix cache so concurrent requests can hit it."""
        cache = self.caches[req.rank]
        if not cache.enabled:
            return
        before = req.slots
        res = cache.cache_request(req.context_tokens(), req.slots, req.handle, finished=False)
        req.handle, req.slots = res.handle, res.slots
        if not torch.equal(before[: len(res.slots)], res.slots):
            self._remaps[req.rank][req.request_id] = req.slots.tolist()

    def finish(self, req: Request, cache_kv: bool = True) -> None:
        """Frees (or caches) a running request's KV and forgets it. Safe to call once per request."""
        if self.running.pop(req.request_id, None) is not None:
            cache = self.caches[req.rank]
            self.reserved[req.rank] -= req.reserved
            req.reserved = 0
            if cache_kv:
                cache.cache_request(req.context_tokens(), req.slots, req.handle, finished=True)
            else:
                cache.release(req.slots, req.handle)
            if req.announced:
                self._released[req.rank].append(req.request_id)
        else:
            self.remove_waiting(req)
        req.status = Status.FINISHED

    # -- numbers --------------------------------------------------------------------------------
    def kv_used(self) -> int:
        return sum(c.used_slots - c.evictable_tokens for c in self.caches)

    def kv_total(self) -> int:
        return sum(c.total_slots for c in self.caches)

    def kv_reserved(self) -> int:
        """KV slots admission counts as spoken for beyond what is held: lifetime reservations, or
        the estimated growth of running requests under admission by use."""
        return sum(self.reserved) + (self.estimated_growth() if self.config.admission == "use" else 0)
