"""Parse tool calls out of generated content into OpenAI `tool_calls` entries, in one shot or while streaming.

Two bodies can sit inside `<tool_call>…</tool_call>`, told apart per call:
* 4.6 (Qwen3.5 / Qwen3-coder XML, what its template asks for):
  `<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>`. Values are text; the tool's JSON schema
  says which become ints, numbers, booleans, objects or arrays (as vLLM's qwen3_coder parser does).
* 4.5 (Hermes / Qwen3 JSON, what its template asks for): `{"name": NAME, "arguments": {...}}`, or the same written
  as a Python dict (`{'name': 'f', 'arguments': {'on': True}}`).

The XML body is read by a scanner (tool_call_scan.py), not a first-match regex: a string value may hold
tool-call markup of its own (code, a quoted example), so a closing tag ends a value only at nesting depth 0 and
only when what follows it continues a call. A `<function=...>` block without its `<tool_call>` wrapper is a call
too, and so is one whose arguments are a JSON (or Python-dict) object instead of `<parameter=...>` tags. A call that cannot be read (or names a function the request did not offer) is given back as content,
verbatim; nothing is dropped.

Streaming follows OpenAI: a call is announced (id and name) as soon as its `<function=NAME>` is read, then its
`arguments` arrive in pieces, one per finished parameter, whose concatenation is exactly the one-shot `arguments`.
Text outside the calls stays content; whitespace that only separates content from calls is dropped. The one-shot
parse runs the streaming parser, so the two always agree.
"""

from __future__ import annotations

import uuid
from typing import Any

from minicpmv.prompt.reasoning import held_tag_prefix
from minicpmv.prompt.tool_call_scan import CALL_OPEN, FUNCTION_OPEN, CallScan, parameter_schemas

# event kinds of ToolCallStreamParser
CONTENT = "content"
TOOL_CALL = "tool_call"  # a finished call: the whole OpenAI entry
TOOL_CALL_DELTA = "tool_call_delta"  # streaming: {"index", "id", "name"} first, then {"index", "arguments"} pieces


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole generation; content is None when nothing but calls (or nothing) was said."""
    parser = ToolCallStreamParser(tools)
    events = parser.feed(text) + parser.flush()
    content = "".join(v for kind, v in events if kind == CONTENT)
    return content or None, [v for kind, v in events if kind == TOOL_CALL]


class ToolCallStreamParser:
    """feed(delta) -> events; flush() at the end of generation. Events: ("content", text),
    ("tool_call_delta", {...}) while a call streams, and ("tool_call", entry) once it is complete.

    Content is streamed as it comes, except a possible partial opening tag and trailing whitespace (dropped if a
    call follows). A call ends at its closing tag (or at flush, if generation stopped inside it).
    """

    def __init__(self, tools: list[dict] | None = None):
        self._schemas = parameter_schemas(tools or [])
        self._check_names = bool(tools)  # with tools given, a call must name one of them
        self._buffer = ""  # content: a possible tag prefix; inside a call: the call's text so far
        self._in_call = False
        self._held_space = ""  # trailing whitespace of content, dropped if a call follows
        self._space_before_call = ""  # given back if the call turns out unreadable
        self._after_call = False  # drop whitespace between a call and what follows
        self._index = 0  # the next call's position in tool_calls
        self._id = ""  # the current call's id
        self._sent_params = -1  # parameters of the current call already streamed; -1: not announced yet
        self._memo: dict = {}  # the scanner's progress through the current call (see CallScan)

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        self._buffer += delta
        self._run(out, final=False)
        return out

    def flush(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        self._run(out, final=True)
        if self._held_space:
            _append(out, CONTENT, self._held_space)
        self._buffer = self._held_space = ""
        return out

    def _run(self, out: list, final: bool) -> None:
        while self._buffer:
            if not self._in_call:
                text = self._buffer
                starts = [i for tag in (CALL_OPEN, FUNCTION_OPEN) if (i := text.find(tag)) != -1]
                if not starts:
                    keep = 0 if final else held_tag_prefix(text, (CALL_OPEN, FUNCTION_OPEN))
                    self._emit(text[: len(text) - keep], out)
                    self._buffer = text[len(text) - keep :]
                    return
                start = min(starts)
                self._emit(text[:start], out)
                self._space_before_call, self._held_space = self._held_space, ""
                self._in_call, self._buffer = True, text[start:]
                self._id, self._sent_params, self._memo = f"call_{uuid.uuid4().hex[:24]}", -1, {}
            scan = CallScan(self._buffer, final=final, schemas=self._schemas, check_names=self._check_names,
                            memo=self._memo).run()
            self._stream(scan, out)
            if scan.status == "wait":
                return
            self._finish(scan, out)

    def _stream(self, scan: CallScan, out: list) -> None:
        """Announce the call and send the arguments of every parameter finished since the last look."""
        if scan.name is None:
            return
        if self._sent_params < 0:
            out.append((TOOL_CALL_DELTA, {"index": self._index, "id": self._id, "name": scan.name}))
            self._sent_params = 0
        for k in range(self._sent_params, len(scan.pieces)):
            out.append((TOOL_CALL_DELTA, {"index": self._index, "arguments": scan.pieces[k]}))
        self._sent_params = len(scan.pieces)

    def _finish(self, scan: CallScan, out: list) -> None:
        text, self._buffer, self._in_call = self._buffer[: scan.end], self._buffer[scan.end :], False
        if scan.status == "call":
            closing = scan.closing()
            if closing:
                out.append((TOOL_CALL_DELTA, {"index": self._index, "arguments": closing}))
            entry = {"id": self._id, "type": "function",
                     "function": {"name": scan.name, "arguments": scan.arguments()}}
            _append(out, TOOL_CALL, entry)
            self._index += 1
            self._after_call = True
        else:  # unreadable: the text as it was, with the space that led to it
            self._emit(self._space_before_call + text, out)
        self._space_before_call = ""

    def _emit(self, text: str, out: list) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if not body:
            self._held_space += text
            return
        _append(out, CONTENT, self._held_space + body)
        self._held_space = text[len(body) :]


def _append(out: list, kind: str, value: Any) -> None:
    if kind == CONTENT and out and out[-1][0] == CONTENT:
        out[-1] = (CONTENT, out[-1][1] + value)
    else:
        out.append((kind, value))
