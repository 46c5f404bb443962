"""Read one tool call from the text that starts at its opening tag (`<tool_call>` or a bare `<function=`).

`CallScan(text, final=...).run()` decides from the text so far: "call" (with its end), "text" (an unreadable call
and where it ends) or "wait" (more text could change the answer; never returned when `final`). It is a pure
function of the text, so a streaming parser that rescans its growing buffer reaches the same decision as a
one-shot parse of the whole, wherever the deltas were cut. While waiting it still reports what is settled: the
function name once `<function=NAME>` is read and one `arguments` piece per finished parameter.

XML values: `<parameter=ARG>\\nVALUE\\n</parameter>`. A value whose schema type is a string (or unknown) may hold
markup of its own, so tags nest there: `<tool_call>\\n`, `<function=X>\\n` and `<parameter=X>\\n` open, and the
matching close tags close them. A close tag at depth 0 ends the value only when what follows continues the call:
`</parameter>` then another `<parameter=`, `</function>` or `</tool_call>`; `</function>` (the model forgot
`</parameter>`) then `</tool_call>` or the next call; `</tool_call>` then the next call or the end. Typed values
(integer, number, boolean, object, array) cannot hold markup: no nesting there.
"""

from __future__ import annotations

import ast
import json
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
_CLOSERS = {PARAMETER_CLOSE: "parameter", FUNCTION_CLOSE: "function", CALL_CLOSE: "call"}
_NAME_MAX = 256  # a `<function=` / `<parameter=` tag without `>` this far is not a tag


class _More(Exception):
    """The text so far cannot decide; wait for the next delta."""


class CallScan:
    def __init__(self, text: str, *, final: bool, schemas: dict[str, dict] | None = None, check_names: bool = False,
                 memo: dict | None = None):
        """`memo`: kept by a streaming caller across scans of one growing call, so a long value is scanned once
        in all, not once per delta (valid because the text only grows and every decision before a wait was
        final)."""
        self.text, self.final = text, final
        self._memo = {} if memo is None else memo  # value start -> (scan position, open-tag stack) at the last wait
        self.schemas, self.check_names = schemas or {}, check_names
        self.status = "wait"  # "call" | "text" | "wait"
        self.end = 0  # characters of `text` the call (or the unreadable text) spans
        self.name: str | None = None  # set once the call is certain
        self.pieces: list[str] = []  # the arguments JSON, one piece per finished parameter
        self._json_body = False
        self._properties: dict = {}
        self._seen: set[str] = set()

    def run(self) -> "CallScan":
        try:
            self.status, self.end = self._call()
        except _More:
            self.status = "wait"
        return self

    def closing(self) -> str:
        """The last piece of `arguments`, sent when the call is complete."""
        return "" if self._json_body else ("}" if self.pieces else "{}")

    def arguments(self) -> str:
        return "".join(self.pieces) + self.closing()

    # -- the call ------------------------------------------------------------------------------
    def _call(self) -> tuple[str, int]:
        t = self.text
        if not t.startswith(CALL_OPEN):
            return self._function(0, wrapped=False)
        i = self._skip_space(len(CALL_OPEN))
        if i == len(t):
            return "text", len(t)
        if t[i] == "{":
            return self._json(i)
        if self._at(i, FUNCTION_OPEN):
            return self._function(i, wrapped=True)
        return self._unreadable(i)

    def _unreadable(self, i: int) -> tuple[str, int]:
        """A `<tool_call>` whose body is neither form: text up to its `</tool_call>`."""
        close = self.text.find(CALL_CLOSE, i)
        if close == -1:
            self._need(True)
            return "text", len(self.text)
        return "text", close + len(CALL_CLOSE)

    def _function(self, i: int, wrapped: bool) -> tuple[str, int]:
        name, after = self._tag_name(i, FUNCTION_OPEN)
        if name is None:
            return self._unreadable(i) if wrapped else ("text", len(FUNCTION_OPEN))
        name = self._tool_name(name)
        known = not self.check_names or name in self.schemas
        if wrapped and known:
            self.name = name  # inside <tool_call>, a known function name is a call: announce it now
        j = self._skip_space(after)
        json_arguments = j < len(self.text) and self.text[j] == "{"
        if not wrapped:  # a bare block is a call only if it names a tool and goes on like one
            looks_like_call = j < len(self.text) and (
                json_arguments or self._at(j, PARAMETER_OPEN) or self._at(j, FUNCTION_CLOSE))
            if not (known and looks_like_call):
                return "text", after
        self._properties = self.schemas.get(name, {})
        if known:
            self.name = name
        if json_arguments:  # `<function=NAME>{"arg": ...}</function>`: JSON (or Python-dict) arguments
            found = self._json_arguments(j)
            if found is not None:
                return ("call" if known else "text"), found
        _, end = self._parameters(after)
        return ("call" if known else "text"), end

    def _json_arguments(self, i: int) -> int | None:
        """Where the call ends, when a JSON object of arguments runs from `i` to a `</function>`; else None."""
        t = self.text
        search = i
        while True:
            close = t.find(FUNCTION_CLOSE, search)
            if close == -1:
                self._need(True)
            body = t[i:] if close == -1 else t[i:close]
            arguments = load_literal(body.strip())
            if isinstance(arguments, dict):
                self._json_body, self.pieces = True, [json.dumps(arguments, ensure_ascii=False)]
                return len(t) if close == -1 else self._after_function(close + len(FUNCTION_CLOSE))[1]
            if close == -1 or not _open_string(body):
                return None
            search = close + 1

    def _parameters(self, i: int) -> tuple[str, int]:
        t = self.text
        while True:
            i = self._skip_space(i)
            if i == len(t):
                return "call", i  # generation stopped inside the call: keep what was finished
            if self._at(i, PARAMETER_OPEN):
                name, after = self._tag_name(i, PARAMETER_OPEN)
                if name is not None:
                    value, i = self._value(after, name)
                    self._add(name, value)
                    continue
            elif self._at(i, FUNCTION_CLOSE):
                return self._after_function(i + len(FUNCTION_CLOSE))
            elif self._at(i, CALL_CLOSE):
                return "call", i + len(CALL_CLOSE)
            nxt = t.find("<", i + 1)  # stray text between parameters: skipped
            if nxt == -1:
                self._need(True)
                return "call", len(t)
            i = nxt

    def _after_function(self, i: int) -> tuple[str, int]:
        t = self.text
        k = i
        while k < len(t) and t[k].isspace():
            k += 1
        if k == len(t):
            self._need(True)
            return "call", i
        if t.startswith(CALL_CLOSE, k):
            return "call", k + len(CALL_CLOSE)
        self._need(CALL_CLOSE.startswith(t[k:]))
        return "call", i  # no `</tool_call>` after the function: the call ends with it

    # -- one parameter value -------------------------------------------------------------------
    def _value(self, start: int, name: str) -> tuple[str, int]:
        """(raw value, where scanning goes on) for the value that starts at `start`."""
        t = self.text
        nested = _is_text(self._properties.get(name))
        k, stack = self._memo.get(start, (start, []))
        stack = list(stack)
        try:
            while True:  # k: every tag before it is decided (a raise below leaves k and stack as they were)
                lt = t.find("<", k)
                if lt == -1:
                    self._need(True)
                    return t[start:], len(t)
                tag = self._tag_at(lt)
                if tag is None:
                    k = lt + 1
                    continue
                kind, opening, length = tag
                if opening:
                    if nested:
                        stack.append(kind)
                elif stack:
                    if stack[-1] == kind:
                        stack.pop()
                elif self._closes_value(kind, lt + length):
                    return t[start:lt], (lt + length if kind == "parameter" else lt)
                k = lt + length
        except _More:
            self._memo[start] = (k, stack)
            raise

    def _tag_at(self, lt: int) -> tuple[str, bool, int] | None:
        """(kind, opening, length) of the markup at `lt`, or None for a plain '<'."""
        t = self.text
        for closer, kind in _CLOSERS.items():
            if t.startswith(closer, lt):
                return kind, False, len(closer)
        if t.startswith(CALL_OPEN + "\n", lt):
            return "call", True, len(CALL_OPEN) + 1
        for opener, kind in ((FUNCTION_OPEN, "function"), (PARAMETER_OPEN, "parameter")):
            if t.startswith(opener, lt):
                name, after = self._tag_name(lt, opener)
                if name is None:
                    return None
                self._need(after == len(t))
                return (kind, True, after + 1 - lt) if t.startswith("\n", after) else None
        rest = t[lt:]
        self._need(any(tag.startswith(rest) for tag in (*_CLOSERS, CALL_OPEN + "\n", FUNCTION_OPEN, PARAMETER_OPEN)))
        return None

    def _closes_value(self, kind: str, j: int) -> bool:
        """Does the close tag of `kind` that ends at `j` end the current value? Decided by what follows."""
        t = self.text
        while j < len(t) and t[j].isspace():
            j += 1
        if j == len(t):
            self._need(True)
            return True
        rest = t[j:]
        follows = {"parameter": (PARAMETER_OPEN, FUNCTION_CLOSE, CALL_CLOSE),
                   "function": (CALL_CLOSE, CALL_OPEN, FUNCTION_OPEN),
                   "call": (CALL_OPEN, FUNCTION_OPEN)}[kind]
        for tag in follows:
            if rest.startswith(tag):
                if tag != PARAMETER_OPEN:
                    return True
                return self._tag_name(j, PARAMETER_OPEN)[0] is not None
        self._need(any(tag.startswith(rest) for tag in follows))
        return False

    def _add(self, name: str, raw: str) -> None:
        if name in self._seen:  # a repeated parameter: the first one counts
            return
        self._seen.add(name)
        raw = raw[1:] if raw.startswith("\n") else raw  # the template puts the value on its own lines
        raw = raw[:-1] if raw.endswith("\n") else raw
        value = convert_value(raw, self._properties.get(name))
        lead = ", " if self.pieces else "{"
        self.pieces.append(f"{lead}{json.dumps(name, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}")

    # -- the 4.5 JSON body ---------------------------------------------------------------------
    def _json(self, i: int) -> tuple[str, int]:
        t = self.text
        search = i
        while True:
            close = t.find(CALL_CLOSE, search)
            if close == -1:
                self._need(True)
            body, end = (t[i:], len(t)) if close == -1 else (t[i:close], close + len(CALL_CLOSE))
            call = read_json_call(body)
            if call is not None:
                name, arguments = call
                name = self._tool_name(name)
                if self.check_names and name not in self.schemas:
                    return "text", end
                self.name, self._json_body = name, True
                self.pieces = [json.dumps(arguments, ensure_ascii=False)]
                return "call", end
            if close == -1 or not _open_string(body):
                return "text", end
            search = close + 1  # the `</tool_call>` sat inside a string: the call goes on

    def _tool_name(self, name: str) -> str:
        """`functions.get_weather` (OpenAI's namespace, which some models copy) is `get_weather` when that is
        one of the request's tools."""
        bare = name.removeprefix("functions.")
        return bare if bare != name and bare in self.schemas and name not in self.schemas else name

    # -- small readers -------------------------------------------------------------------------
    def _need(self, undecided: bool) -> None:
        if undecided and not self.final:
            raise _More

    def _skip_space(self, i: int) -> int:
        t = self.text
        while i < len(t) and t[i].isspace():
            i += 1
        self._need(i == len(t))
        return i

    def _at(self, i: int, tag: str) -> bool:
        if self.text.startswith(tag, i):
            return True
        self._need(tag.startswith(self.text[i:]))
        return False

    def _tag_name(self, i: int, opener: str) -> tuple[str | None, int]:
        """(name, index after '>') of `<function=NAME>` / `<parameter=NAME>` at `i`; name None if malformed."""
        t = self.text
        j = i + len(opener)
        close = t.find(">", j, j + _NAME_MAX + 1)
        if close == -1:
            self._need(len(t) - j <= _NAME_MAX and not any(c in t[j:] for c in "\n<"))
            return None, j
        name = t[j:close].strip().strip("\"'").strip()
        if not name or any(c in name for c in "\n<"):
            return None, j
        return name, close + 1


# -- values by schema ----------------------------------------------------------------------------
def parameter_schemas(tools: list[dict]) -> dict[str, dict]:
    """{function name: {parameter name: JSON schema}} from OpenAI-style (or bare function) tool definitions."""
    schemas = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            properties = (function.get("parameters") or {}).get("properties") or {}
            schemas[function["name"]] = properties if isinstance(properties, dict) else {}
    return schemas


def schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    for key in ("anyOf", "oneOf"):  # e.g. {"anyOf": [{"type": "integer"}, {"type": "null"}]}
        for option in schema.get(key) or []:
            types += schema_types(option)
    return [t.lower() for t in types if isinstance(t, str)]


def _is_text(schema: Any) -> bool:
    types = schema_types(schema)
    return not types or "string" in types


def convert_value(value: str, schema: Any) -> Any:
    """The parameter's text as the JSON type its schema asks for; text stays text when no conversion fits."""
    types = schema_types(schema)
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


def _to_number(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        pass
    try:
        number = float(v)
    except ValueError:
        return _NO
    return number if number == number and abs(number) != float("inf") else _NO  # JSON has no NaN / inf


def _to_int(v: str) -> Any:
    number = _to_number(v)
    if isinstance(number, float):  # "3.0" is the integer 3; "3.5" is no integer
        return int(number) if number.is_integer() else _NO
    return number


def _to_bool(v: str) -> Any:
    return {"true": True, "false": False}.get(v.lower(), _NO)


def load_literal(text: str) -> Any:
    """A JSON value, or a Python literal that is one ({'a': True, 'b': None}); _NO when neither."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        result = ast.literal_eval(text)
        json.dumps(result)  # literal_eval may yield bytes, sets, complex numbers...: not JSON
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NO
    return result


def _to_structure(kind: type) -> Any:
    def convert(v: str) -> Any:
        result = load_literal(v)
        if isinstance(result, tuple) and kind is list:
            result = list(result)
        return result if isinstance(result, kind) else _NO

    return convert


_CONVERTERS = {
    "integer": _to_int,
    "number": _to_number,
    "boolean": _to_bool,
    "object": _to_structure(dict),
    "array": _to_structure(list),
}


def read_json_call(body: str) -> tuple[str, dict] | None:
    """(name, arguments) of a JSON (or Python-dict) call body, or None."""
    call = load_literal(body.strip())
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models emit the arguments as a string
        arguments = load_literal(arguments) if arguments.strip() else {}
    return (call["name"].strip(), arguments) if isinstance(arguments, dict) else None


def _open_string(body: str) -> bool:
    """True when `body` ends inside a quoted string (so a `</tool_call>` after it may be part of that string)."""
    quote, escaped = None, False
    for ch in body:
        if quote is None:
            if ch in "\"'":
                quote = ch
        elif escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == quote:
            quote = None
    return quote is not None
