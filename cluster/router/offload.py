"""Tokenization and chat templating off the router's event loop, in two bounded lanes.

Encoding a multi-megabyte prompt takes seconds; on the event loop it stalled every other request
(a 10 MB body held a 2-token request for 14 s). Each call runs in a worker thread: inputs up to
`large_bytes` in the small lane (a few threads), bigger ones in a lane of their own (one thread),
so a huge prompt costs its sender's time and never takes the threads the small ones use. The
Rust tokenizer releases the GIL while it encodes. Inputs up to `inline_bytes` run right on the
loop: they take less time than the hop to a thread and back (which under a burst of small
requests was most of their cost).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class OffLoop:
    def __init__(self, small_threads: int = 2, large_threads: int = 1, large_bytes: int = 64 * 1024,
                 inline_bytes: int = 2048) -> None:
        self.large_bytes = large_bytes
        self.inline_bytes = inline_bytes
        self._small = ThreadPoolExecutor(small_threads, thread_name_prefix="tokenize")
        self._large = ThreadPoolExecutor(large_threads, thread_name_prefix="tokenize-large")

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        if size <= self.inline_bytes:
            return fn(*args)
        lane = self._large if size > self.large_bytes else self._small
        return await asyncio.get_running_loop().run_in_executor(lane, fn, *args)

    def close(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)
