"""Parse tool calls out of generated content into OpenAI `tool_calls` entries, in one shot or while streaming.

Two bodies can sit inside `<tool_call>…</tool_call>`, told apart per call:
* 4.6 (Qwen3.5 / Qwen3-coder XML, what its template asks for):
  `<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>`. Values are text; the tool's JSON schema
  says which become ints, numbers, booleans, objects or arrays (as vLLM's qwen3_coder parser does).
* 4.5 (Hermes / Qwen3 JSON, what its template asks for): `{"name": NAME, "arguments": {...}}`.
Text outside the calls stays content; whitespace that only separates content from calls is dropped. A call whose
body cannot be parsed is given back as content, verbatim. The one-shot parse runs the streaming parser.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

from minicpmv.prompt.reasoning import held_tag_prefix

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

_FUNCTION_RE = re.compile(r"<function=([^>\n]*)>")
_PARAM_RE = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|\Z)", re.DOTALL)


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole generation; content is None when nothing but calls (or nothing) was said."""
    parser = ToolCallStreamParser(tools)
    events = parser.feed(text) + parser.flush()
    content = "".join(v for kind, v in events if kind == "content")
    return content or None, [v for kind, v in events if kind == "tool_call"]


class ToolCallStreamParser:
    """feed(delta) -> [("content", text) | ("tool_call", entry), ...]; flush() at the end of generation.

    Content is streamed as it comes, except a possible partial `<tool_call>` and trailing whitespace (which is
    dropped if a call follows). A call is emitted once its `</tool_call>` arrives (or at flush, if left open).
    """

    def __init__(self, tools: list[dict] | None = None):
        self._schemas = _parameter_schemas(tools or [])
        self._buffer = ""  # content: a possible tag prefix; inside a call: the call body so far
        self._in_call = False
        self._held_space = ""  # trailing whitespace of content, dropped if a call follows
        self._space_before_call = ""  # given back if the call turns out unparsable
        self._after_call = False  # drop whitespace between a call and what follows

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        text = self._buffer + delta
        while True:
            if self._in_call:
                end = text.find(CALL_CLOSE)
                if end == -1:
                    self._buffer = text
                    return out
                self._finish_call(text[:end], CALL_CLOSE, out)
                text = text[end + len(CALL_CLOSE) :]
            else:
                start = text.find(CALL_OPEN)
                if start == -1:
                    keep = held_tag_prefix(text, (CALL_OPEN,))
                    self._emit(text[: len(text) - keep], out)
                    self._buffer = text[len(text) - keep :]
                    return out
                self._emit(text[:start], out)
                self._space_before_call, self._held_space = self._held_space, ""
                self._in_call = True
                text = text[start + len(CALL_OPEN) :]

    def flush(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if self._in_call:  # generation stopped before </tool_call>: keep the call if its body is complete enough
            self._finish_call(self._buffer, "", out)
        else:
            self._emit(self._buffer, out)
        if self._held_space:
            _append(out, "content", self._held_space)
        self._buffer = self._held_space = ""
        return out

    def _finish_call(self, body: str, close: str, out: list) -> None:
        self._in_call = False
        call = _parse_call(body, self._schemas)
        if call is None:
            self._emit(self._space_before_call + CALL_OPEN + body + close, out)
        else:
            _append(out, "tool_call", call)
            self._after_call = True
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
        _append(out, "content", self._held_space + body)
        self._held_space = text[len(body) :]


def _append(out: list, kind: str, value: Any) -> None:
    if kind == "content" and out and out[-1][0] == "content":
        out[-1] = ("content", out[-1][1] + value)
    else:
        out.append((kind, value))


def _parse_call(body: str, schemas: dict[str, dict]) -> dict | None:
    """One OpenAI tool_calls entry from a call body, or None if it is neither valid XML-style nor JSON."""
    parsed = _parse_json_body(body) if body.lstrip().startswith("{") else _parse_xml_body(body, schemas)
    if parsed is None:
        return None
    name, arguments = parsed
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _parse_xml_body(body: str, schemas: dict[str, dict]) -> tuple[str, dict] | None:
    match = _FUNCTION_RE.search(body)
    if match is None or not match.group(1).strip():
        return None
    name = match.group(1).strip()
    inner = body[match.end() :].split("</function>", 1)[0]
    properties = schemas.get(name, {})
    arguments = {}
    for param in _PARAM_RE.finditer(inner):
        value = param.group(2)
        value = value[1:] if value.startswith("\n") else value  # the template puts the value on its own lines
        value = value[:-1] if value.endswith("\n") else value
        arguments[param.group(1).strip()] = _convert(value, properties.get(param.group(1).strip()))
    return name, arguments


def _parse_json_body(body: str) -> tuple[str, dict] | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return (call["name"], arguments) if isinstance(arguments, dict) else None


def _parameter_schemas(tools: list[dict]) -> dict[str, dict]:
    """{function name: {parameter name: JSON schema}} from OpenAI-style (or bare function) tool definitions."""
    schemas = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            properties = (function.get("parameters") or {}).get("properties") or {}
            schemas[function["name"]] = properties if isinstance(properties, dict) else {}
    return schemas


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    for key in ("anyOf", "oneOf"):  # e.g. {"anyOf": [{"type": "integer"}, {"type": "null"}]}
        for option in schema.get(key) or []:
            types += _schema_types(option)
    return [t.lower() for t in types if isinstance(t, str)]


def _convert(value: str, schema: Any) -> Any:
    """The parameter's text as the JSON type its schema asks for; text stays text when no conversion fits."""
    types = _schema_types(schema)
    if "string" in types or not types:
        return value
    if "null" in types and value.strip().lower() in ("null", "none"):
        return None
    for kind in types:
        converted = _CONVERTERS.get(kind, lambda v: _NO)(value.strip())
        if converted is not _NO:
            return converted
    return value


_NO = object()  # "this conversion does not fit"


def _to_int(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        return _NO


def _to_number(v: str) -> Any:
    if (as_int := _to_int(v)) is not _NO:
        return as_int
    try:
        number = float(v)
    except ValueError:
        return _NO
    return number if number == number and abs(number) != float("inf") else _NO  # JSON has no NaN / inf


def _to_bool(v: str) -> Any:
    return {"true": True, "false": False}.get(v.lower(), _NO)


def _to_structure(kind: type) -> Any:
    def convert(v: str) -> Any:
        for load in (json.loads, ast.literal_eval):  # models sometimes write Python literals ({'a': True})
            try:
                result = load(v)
                json.dumps(result)  # literal_eval may yield tuples of bytes, sets, ...: not JSON
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(result, kind):
                return result
        return _NO

    return convert


_CONVERTERS = {
    "integer": _to_int,
    "number": _to_number,
    "boolean": _to_bool,
    "object": _to_structure(dict),
    "array": _to_structure(list),
}
