"""tool_choice "required" and a named function, enforced while decoding.

The answer is constrained (constrained.py, llguidance) to one or more calls in the Hermes JSON body that every
MiniCPM-V tool-call parser reads, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, with the
arguments held to the function's JSON schema. "required": one call or more, to any offered function; a named
function: exactly one call to it. With thinking on, the reasoning stays free and the calls follow it.
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import InputError


def chosen_function(tool_choice: Any, tools: list[dict]) -> str | None:
    """The function a tool_choice names ({"type": "function", "function": {"name": ...}}), checked against the
    request's tools; None for "none" / "auto" / "required"."""
    if not isinstance(tool_choice, dict):
        return None
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise InputError('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": "..."}}')
    if name not in {t["function"]["name"] for t in tools}:
        raise InputError(f"tool_choice names the function {name!r}, which is not among the request's tools")
    return name


def tool_call_grammar(tools: list[dict], name: str | None, tag_is_token: bool, parallel: bool = True) -> str:
    """A Lark grammar (llguidance dialect) for the calls: exactly one call of `name`, or with `name` None one
    call to any function (several when `parallel`). `tag_is_token`: <tool_call> is one token of the vocabulary."""
    bodies = [_call_schema(t["function"]) for t in tools if name is None or t["function"]["name"] == name]
    schema = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    open_tag, close_tag = ("<tool_call>", "</tool_call>") if tag_is_token else ('"<tool_call>"', '"</tool_call>"')
    calls = 'call ("\\n" call)*' if name is None and parallel else "call"
    return (f"start: {calls}\n"
            f'call: {open_tag} "\\n" body "\\n" {close_tag}\n'
            f"body: %json {json.dumps(schema)}\n")


def _call_schema(function: dict) -> dict:
    parameters = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}
