"""Streaming split of DeepSeek-R1 output into reasoning and answer (content).

R1's chat template ends the prompt with '<think>\\n', so generation starts inside reasoning
(`starts_in_reasoning=True`); pass False for models/templates that do not think by default.
`<think>` switches to reasoning, `</think>` to content; the tags themselves never reach either
stream, even when split across deltas: a suffix that could still grow into a tag is held back
until the next delta (or finish()) decides it. A stray `<think>` inside reasoning or `</think>`
inside content is dropped. Text is passed through verbatim (the blank lines R1 writes after
`</think>` stay in the content), as vLLM's streaming parser does.

If the stream ends without `</think>` (e.g. it hit max_tokens while thinking), what was reasoning
stays reasoning and content is empty, as DeepSeek's API reports it.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

THINK_START = "<think>"
THINK_END = "</think>"


class ReasoningParser:
    """feed() text deltas, get (reasoning_delta, content_delta); finish() at the end."""

    def __init__(self, starts_in_reasoning: bool = True, start_tag: str = THINK_START,
                 end_tag: str = THINK_END):
        self.in_reasoning = starts_in_reasoning
        self._tags = (start_tag, end_tag)
        self._buf = ""  # text not yet attributed: may start a tag

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a tag."""
        for k in range(min(len(text), max(len(t) for t in self._tags) - 1), 0, -1):
            suffix = text[-k:]
            if any(t.startswith(suffix) and len(t) > k for t in self._tags):
                return k
        return 0

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        reasoning: list[str] = []
        content: list[str] = []
        start_tag, end_tag = self._tags
        while True:
            hits = [(i, t) for t in self._tags if (i := self._buf.find(t)) >= 0]
            if not hits:
                break
            i, tag = min(hits)
            (reasoning if self.in_reasoning else content).append(self._buf[:i])
            self._buf = self._buf[i + len(tag):]
            self.in_reasoning = tag == start_tag
        keep = self._held_back(self._buf)
        out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        (reasoning if self.in_reasoning else content).append(out)
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End of stream: held-back text was not a tag after all; it goes to the current side."""
        out, self._buf = self._buf, ""
        return (out, "") if self.in_reasoning else ("", out)
