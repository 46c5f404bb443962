"""The one output pipeline: a sequence's generated ids, token by token -> text (UTF-8 safe) ->
stop strings -> reasoning / content split -> tool calls -> finish reason. The Python API (stream
and one-shot), the CLI, the batch command and the server all read a generation through it, so
they always agree; it also counts the tokens that make up the answer for `usage`. With
`unescape_newlines` (a caller's opt-in) the reasoning and content show escaped newlines as
newlines (minicpmv/newlines.py); tool-call arguments are never touched."""
from __future__ import annotations

from ..newlines import NewlineUnescaper
from ..prompt.detokenizer import IncrementalDetokenizer
from ..prompt.reasoning import CONTENT, REASONING, ReasoningStreamParser
from ..prompt.tool_calls import ToolCallStreamParser


class OutputDecoder:
    """feed(token_id) / finish(reason) -> events: ("reasoning" | "content", text) or ("tool_call", dict)."""

    def __init__(self, tokenizer, stop_token_ids, *, starts_in_reasoning: bool, tools: list | None,
                 stop: list[str], unescape_newlines: bool = False):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
        self.reasoning = ReasoningStreamParser(in_reasoning=starts_in_reasoning)
        self.tool_parser = ToolCallStreamParser(tools) if tools else None
        self.stop_token_ids = set(stop_token_ids)
        self.stop = stop
        self._held = ""  # a tail that may be the start of a stop string
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.has_tool_calls = False
        self.display = {REASONING: NewlineUnescaper(), CONTENT: NewlineUnescaper()} if unescape_newlines else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token_id: int) -> list:
        if self.done:
            return []  # tokens the engine made before it saw our abort (after a stop string)
        self.num_tokens += 1
        if token_id in self.stop_token_ids:
            return []
        return self._display(self._text(self.detok.add(token_id), final=False))

    def finish(self, reason: str) -> list:
        """The engine finished the sequence ("stop" | "length"); flush everything held back."""
        if self.done:
            return []
        events = self._text(self.detok.flush(), final=True)
        return self._display(events + self._close(reason))

    def _display(self, events: list) -> list:
        """Escaped newlines -> newlines (when asked), flushing the held tails once the choice is done."""
        if self.display is None:
            return events
        out = []
        for kind, value in events:
            if kind in self.display:
                value = self.display[kind].feed(value)
            if value:
                out.append((kind, value))
        if self.done:
            out += [(kind, rest) for kind, stream in self.display.items() if (rest := stream.flush())]
        return out

    def _text(self, text: str, final: bool) -> list:
        text, hit = self._cut_at_stop(self._held + text, final)
        events = self._route(self.reasoning.feed(text)) if text else []
        if hit:
            events += self._close("stop")
        return events

    def _cut_at_stop(self, text: str, final: bool) -> tuple[str, bool]:
        hits = [i for s in self.stop if (i := text.find(s)) != -1]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0 if final else _partial_stop_suffix(text, self.stop)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep], False

    def _close(self, reason: str) -> list:
        events = self._route(self.reasoning.flush())
        if self.tool_parser:
            events += self._tools(self.tool_parser.flush())
        self.finish_reason = "tool_calls" if self.has_tool_calls and reason == "stop" else reason
        return events

    def _route(self, pieces: list) -> list:
        events = []
        for kind, text in pieces:
            if kind == REASONING or self.tool_parser is None:
                events.append((kind, text))
            else:
                events += self._tools(self.tool_parser.feed(text))
        return events

    def _tools(self, events: list) -> list:
        self.has_tool_calls |= any(kind == "tool_call" for kind, _ in events)
        return events


def _partial_stop_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that some stop string starts with."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0
