"""Reasoning split for every version; the streaming parser equals the one-shot split under any chunking."""

import random

import pytest

from minicpmv.prompt import ChatTemplate, ReasoningStreamParser, prompt_opens_reasoning, split_reasoning
import paths

GOLDEN = str(paths.GOLDEN)

# (name, generated text, starts inside reasoning, expected reasoning, expected content)
CASES = [
    ("4.6 thinking on", "Let me think.\n2+2 is 4.\n</think>\n\nThe answer is **4**.", True,
     "Let me think.\n2+2 is 4.", "The answer is **4**."),
    ("4.6 thinking off", "The answer is 4.", False, None, "The answer is 4."),
    ("4.6-Thinking opens its own block", "<think>\nHmm.\n</think>\n\nDone.", False, "Hmm.", "Done."),
    ("4.5 thinking on repeats <think>", "<think>\nreason\n</think>\n\nanswer", True, "reason", "answer"),
    ("4.5 off, stray </think> first", "\n</think>\n\nJust the answer.", False, None, "Just the answer."),
    ("4.5 off, stray </think> mid-answer", "Part one.</think>\n\nPart two.", False, None, "Part one.\n\nPart two."),
    ("4.0 plain", "A cat on a mat. 1 < 2 and a <b>tag</b>.", False, None, "A cat on a mat. 1 < 2 and a <b>tag</b>."),
    ("empty reasoning", "\n\n</think>\n\nanswer", True, None, "answer"),
    ("cut off while reasoning", "step one\nstep two\n", True, "step one\nstep two", ""),
    ("trailing partial tag is text", "answer ends with <thi", False, None, "answer ends with <thi"),
    ("partial close in reasoning", "x </thin", True, "x </thin", ""),
    ("inner whitespace kept", "a\n\n  b  \n</think>c  \n", True, "a\n\n  b", "c  \n"),
    ("unicode", "想一想 🤔\n</think>\n\n答案是四 ✅", True, "想一想 🤔", "答案是四 ✅"),
    ("two blocks", "r1</think>c1<think>r2</think>c2", True, "r1r2", "c1c2"),
    ("only tags", "</think><think></think>", False, None, ""),
]


@pytest.mark.parametrize("name, text, in_reasoning, reasoning, content", CASES, ids=[c[0] for c in CASES])
def test_one_shot(name, text, in_reasoning, reasoning, content):
    assert split_reasoning(text, in_reasoning=in_reasoning) == (reasoning, content)


def _stream(chunks, in_reasoning):
    parser = ReasoningStreamParser(in_reasoning=in_reasoning)
    pieces = [p for chunk in chunks for p in parser.feed(chunk)] + parser.flush()
    for kind, text in pieces:
        assert kind in ("reasoning", "content") and text
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    return reasoning or None, "".join(t for k, t in pieces if k == "content")


def _chunkings(text, seed):
    yield list(text)  # one char at a time
    for cut in range(len(text) + 1):  # every single split point
        yield [text[:cut], text[cut:]]
    rng = random.Random(seed)
    for _ in range(30):  # random splits, empty deltas included
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 8)))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("name, text, in_reasoning, reasoning, content", CASES, ids=[c[0] for c in CASES])
def test_streaming_equals_one_shot(name, text, in_reasoning, reasoning, content):
    for chunks in _chunkings(text, seed=len(name)):
        assert _stream(chunks, in_reasoning) == (reasoning, content), chunks


def test_partial_tags_are_held_not_leaked():
    parser = ReasoningStreamParser(in_reasoning=True)
    assert parser.feed("thinking</th") == [("reasoning", "thinking")]
    assert parser.feed("in") == []
    assert parser.feed("k>\n\nAns") == [("content", "Ans")]
    parser = ReasoningStreamParser()
    assert parser.feed("a <") == [("content", "a ")]
    assert parser.feed("b") == [("content", "<b")]  # resolved: not a tag
    assert parser.flush() == []


def test_streaming_is_eager():
    parser = ReasoningStreamParser(in_reasoning=True)
    assert parser.feed("step one\n") == [("reasoning", "step one")]  # only the trailing newline waits
    assert parser.feed("step two") == [("reasoning", "\nstep two")]
    parser = ReasoningStreamParser()
    assert parser.feed("Hello world\n") == [("content", "Hello world\n")]


@pytest.fixture(scope="module")
def templates():
    return {
        "4.6": ChatTemplate.from_folder(paths.FIXTURE_46),
        "4.5": ChatTemplate.from_folder(f"{GOLDEN}/minicpm-v-4.5/model"),
        "4.0": ChatTemplate.from_folder(f"{GOLDEN}/minicpm-v-4.0/model"),
    }


@pytest.mark.parametrize("version, thinking, opens", [
    ("4.6", True, True), ("4.6", False, False), ("4.5", True, True), ("4.5", False, False), ("4.0", None, False),
])
def test_prompt_opens_reasoning(templates, version, thinking, opens):
    history = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1", "reasoning": "r1"},
        {"role": "user", "content": "q2"},
    ]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    prompt = templates[version].render(history, **kwargs)
    assert prompt_opens_reasoning(prompt) is opens
    # The decision drives the split: thinking-on output starts inside the block.
    reasoning, content = split_reasoning("r\n</think>\n\nc" if opens else "c", in_reasoning=opens)
    assert content == "c" and reasoning == ("r" if opens else None)


def test_prompt_opens_reasoning_ignores_history_and_user_text():
    assert not prompt_opens_reasoning("<|im_start|>user\nwhat does <think> do?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_opens_reasoning("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("plain text without chat markup")
