"""A model-free stand-in for AsyncEngine: emits tokens at a set pace.

Why: the router's own cost (per request, per streamed token) is only measurable against an engine
that costs ~nothing, and routing behaviour (retries, queue limits, replicas joining and dying) is
quicker to exercise without loading a model. It speaks the AsyncEngine interface the EngineService
wraps: generate / abort / load / kv_free_slots / kv_total_slots / tokenizer / model_name /
model_config.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, AsyncIterator

from expertmesh.actors.model.config import ModelConfig
from expertmesh.actors.sampling_params import InvalidRequestError
from expertmesh.cluster.engine.detokenizer import IncrementalDetokenizer
from expertmesh.cluster.engine.types import EngineRequest, LoadInfo, RequestOutput

log = logging.getLogger(__name__)


class SyntheticEngine:
    def __init__(self, checkpoint: str | Path, token_interval_s: float = 0.0, kv_total: int = 65536,
                 max_running: int = 256, tokenizer: Any = None, word: str = " hello",
                 script: str | list[int] | None = None) -> None:
        """Emits `word` max_tokens times, or, with `script` (text or token ids), the script's tokens
        (detokenized as the engine does) and then stops as at EOS."""
        from expertmesh.cluster.tokenizer import load_tokenizer

        self.checkpoint = str(checkpoint)
        self.model_config = ModelConfig.from_dir(checkpoint)
        self.tokenizer = tokenizer or load_tokenizer(checkpoint)
        self.model_name = Path(checkpoint).name
        self.token_interval_s = token_interval_s
        self.max_running = max_running
        self._kv_total = kv_total
        self._kv_used = 0
        self._running: dict[str, int] = {}  # request id -> KV tokens held
        self._aborted: set[str] = set()
        self.prompt_tokens_total = 0
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        self._token = (ids[0], self.tokenizer.decode(ids[:1]))
        if isinstance(script, str):
            script = self.tokenizer.encode(script, add_special_tokens=False)
        self.script_ids: list[int] | None = list(script) if script else None

    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        sp = req.sampling.validate()
        if not req.prompt_token_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(self._running) >= self.max_running:
            from expertmesh.cluster.engine.engine import QueueFullError

            raise QueueFullError(f"{len(self._running)} requests running (max_running {self.max_running})")
        rid, n = req.request_id, len(req.prompt_token_ids)
        self._running[rid] = n
        self._kv_used += n
        self.prompt_tokens_total += n
        tid, text = self._token
        script = self.script_ids
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids) if script else None
        steps = min(sp.max_tokens, len(script)) if script else sp.max_tokens
        try:
            for i in range(steps):
                if self.token_interval_s:
                    await asyncio.sleep(self.token_interval_s)
                elif i % 16 == 15:
                    await asyncio.sleep(0)  # let other requests interleave
                if rid in self._aborted:
                    return
                self._running[rid] += 1
                self._kv_used += 1
                last = i == steps - 1
                if script:
                    tid = script[i]
                    text, _ = detok.add([tid])
                    text += detok.flush() if last else ""
                reason = ("stop" if script and i == len(script) - 1 else "length") if last else None
                yield RequestOutput(rid, [tid], text, finished=last, finish_reason=reason,
                                    prompt_tokens=n, completion_tokens=i + 1)
        finally:
            self._release(rid)

    def _release(self, rid: str) -> None:
        self._kv_used -= self._running.pop(rid, 0)
        self._aborted.discard(rid)

    async def abort(self, request_id: str) -> bool:
        if request_id in self._running:
            self._aborted.add(request_id)
            return True
        return False

    def load(self) -> LoadInfo:
        return LoadInfo(running=len(self._running), waiting=0, kv_used_tokens=self._kv_used,
                        kv_total_tokens=self._kv_total, prompt_tokens_total=self.prompt_tokens_total)

    def kv_free_slots(self) -> int:
        return self._kv_total - self._kv_used

    def kv_total_slots(self) -> int:
        return self._kv_total
