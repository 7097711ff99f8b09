"""Incremental detokenization of one streaming request, with stop strings.

Text is decoded over a small window of token ids (vLLM's prefix_offset/read_offset scheme):
  prefix_text = decode(ids[prefix_offset:read_offset]); full = decode(ids[prefix_offset:])
and full[len(prefix_text):] is new text once it does not end in U+FFFD, i.e. once byte-level BPE
tokens have completed their UTF-8 sequence. Decoding a window instead of everything keeps each
step O(window), and decoding whole windows (not token by token) keeps multi-byte characters
split across tokens intact.

Stop strings: new stable text is searched for a stop string (from the first unemitted character,
which is enough because emitted text never ends in a partial stop string); on a hit the output is
cut right before it. Otherwise the longest suffix that is a prefix of some stop string is held
back, so a stop string is never partly emitted.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the output so tokenizers whose decode depends on left context
# (e.g. SentencePiece dropping a leading space at the start) render the first output token as
# they would mid-text. Byte-level BPE (DeepSeek) renders the same either way.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas that are safe to show."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stop = [s for s in stop if s]
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if context and self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends inside a character: its bytes would glue onto the output's.
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pending = ""  # stable decoded text not emitted yet (held for stop strings)
        self._text = ""  # emitted so far
        self._stopped = False
        self._stop_string: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far (add deltas plus flush)."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._stop_string

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _decode_new(self, final: bool) -> str:
        """Text added by ids[read_offset:]; empty while it still ends in an incomplete character,
        unless final (then whatever is there, U+FFFD included, as decode() of everything gives)."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT)):
            return ""
        if not full_text.startswith(prefix_text):
            # Not seen with byte-level BPE; fall back on a full decode of the output to stay exact.
            logger.debug("window decode not prefix-stable; decoding from the start")
            self._prefix_offset = 0
            prefix_text = self._decode(self._ids[:self._read_offset])
            full_text = self._decode(self._ids)
            if not full_text.startswith(prefix_text):
                return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]

    def _take(self, final: bool) -> str:
        """Move what can be shown from the pending text to the emitted text, checking stops."""
        if self._stop:
            hits = [(i, s) for s in self._stop if (i := self._pending.find(s)) >= 0]
            if hits:
                cut = min(i for i, _ in hits)
                self._stop_string = next(s for i, s in hits if i == cut)
                out, self._pending, self._stopped = self._pending[:cut], "", True
                self._text += out
                return out
        hold = 0 if final else self._held_back(self._pending)
        out = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        self._text += out
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def resume(self, token_ids: Sequence[int], emitted_chars: int) -> None:
        """Take over a stream another detokenizer started: feed its tokens, and count the first
        `emitted_chars` characters of their text as already emitted; text it held back (a stop
        string's possible start, an incomplete character) comes out of later calls as usual."""
        self._ids.extend(token_ids)
        self._pending += self._decode_new(final=False)
        full = self._text + self._pending
        emitted_chars = min(emitted_chars, len(full))
        self._text, self._pending = full[:emitted_chars], full[emitted_chars:]

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Feed newly sampled tokens; return (text safe to emit now, whether a stop string hit).
        After a hit, further calls return ("", True)."""
        if self._stopped:
            return "", True
        self._ids.extend(token_ids)
        self._pending += self._decode_new(final=False)
        out = self._take(final=False)
        return out, self._stopped

    def flush(self) -> str:
        """At the end of the request: everything still held back, including a trailing
        incomplete character as U+FFFD (what decode() gives). Cut at a stop string should one
        appear in that remainder (see `stopped`)."""
        if self._stopped:
            return ""
        self._pending += self._decode_new(final=True)
        return self._take(final=True)
