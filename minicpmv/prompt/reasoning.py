"""Split generated text into reasoning and content, in one shot or while streaming.

One rule set serves every MiniCPM-V version; only the starting state differs, and it is read off the prompt:
* 4.5 / 4.6 with thinking on (and 4.6-Thinking): the prompt ends with an open `<think>\\n`, so generation starts
  inside the reasoning block and the first `</think>` switches to content.
* thinking off: the prompt already holds an empty `<think>\\n\\n</think>\\n\\n`, so generation starts in content.
  4.5 sometimes still emits a stray `</think>` there (OpenBMB/MiniCPM-V#988); it is dropped, never shown.
* 4.0: no think block in the prompt; starts in content (a `<think>` block, if one ever appears, is still split off).
* A `<tool_call>` ends the reasoning: a model that calls a tool without closing its `<think>` block (seen with the
  Thinking models) still makes the call. The tag itself goes to the content, where the tool-call parser reads it.

Whitespace: leading whitespace of each block is dropped, as is trailing whitespace of reasoning (the template wraps
it in newlines); the content keeps its own trailing text. The one-shot split runs the streaming parser, so the two
can never disagree.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
_TAGS = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN)

REASONING = "reasoning"
CONTENT = "content"


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the prompt's last turn leaves a `<think>` open, i.e. generation starts inside the reasoning."""
    turn = prompt[prompt.rfind("<|im_start|>") + 1 :]  # the generation prompt; earlier turns close their blocks
    return turn.rfind(THINK_OPEN) > turn.rfind(THINK_CLOSE)


def split_reasoning(text: str, *, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a whole generation; reasoning is None when there was none (or it was empty)."""
    parser = ReasoningStreamParser(in_reasoning=in_reasoning)
    pieces = parser.feed(text) + parser.flush()
    reasoning = "".join(t for kind, t in pieces if kind == REASONING)
    content = "".join(t for kind, t in pieces if kind == CONTENT)
    return reasoning or None, content


def held_tag_prefix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (it may become a tag)."""
    start = text.find("<", max(0, len(text) - max(map(len, tags)) + 1))
    while start != -1:  # earliest candidate first: the longest held suffix wins
        if any(tag.startswith(text[start:]) for tag in tags):
            return len(text) - start
        start = text.find("<", start + 1)
    return 0


class ReasoningStreamParser:
    """feed(delta) -> [(kind, text), ...] with kind "reasoning" or "content"; flush() at the end of generation.

    A possible partial `<think>` / `</think>` at the end of a delta is held back until the next delta decides it.
    """

    def __init__(self, *, in_reasoning: bool = False):
        self.in_reasoning = in_reasoning
        self._pending = ""  # text not yet classified: a possible tag prefix
        self._block_started = False  # a non-whitespace char was emitted in the current block
        self._held_space = ""  # trailing whitespace of reasoning, dropped if the block closes right after

    def feed(self, delta: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self._pending + delta
        while True:
            hits = [(i, tag) for tag in _TAGS if (i := text.find(tag)) != -1]
            if not hits:
                break
            i, tag = min(hits)
            self._emit(text[:i], out)
            text = text[i + len(tag) :]
            self._on_tag(tag)
            if tag == TOOL_CALL_OPEN:
                self._emit(tag, out)
        keep = held_tag_prefix(text, _TAGS)
        self._emit(text[: len(text) - keep], out)
        self._pending = text[len(text) - keep :]
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(self._pending, out)  # an unfinished tag at the very end was just text
        self._pending = ""
        self._held_space = ""  # reasoning cut off mid-block: its trailing whitespace is still trimmed
        return out

    def _on_tag(self, tag: str) -> None:
        if tag == THINK_OPEN and not self.in_reasoning:
            self.in_reasoning, self._block_started = True, False
        elif tag in (THINK_CLOSE, TOOL_CALL_OPEN) and self.in_reasoning:
            self.in_reasoning, self._block_started = False, False
        # A repeated <think> inside reasoning, or a stray </think> in content, is dropped.
        self._held_space = ""

    def _emit(self, text: str, out: list[tuple[str, str]]) -> None:
        if not text:
            return
        if not self._block_started:
            text = text.lstrip()
            if not text:
                return
            self._block_started = True
        if self.in_reasoning:
            body = text.rstrip()
            if not body:
                self._held_space += text
                return
            text, self._held_space = self._held_space + body, text[len(body) :]
        kind = REASONING if self.in_reasoning else CONTENT
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
