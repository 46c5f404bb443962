"""Render a checkpoint's own jinja chat template, byte-identical to transformers' `apply_chat_template(tokenize=False)`.

The environment below mirrors transformers 5.23 `chat_template_utils._cached_compile_jinja_template` and the data
preparation of `render_jinja_template` / `apply_chat_template`, because any difference (a filter option, a dropped
None key, a missing special-token variable) silently changes the prompt the model sees.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minicpmv.errors import InputError

# Plain ChatML, for checkpoints that ship no template (what vLLM falls back to for MiniCPM-V 4.0).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# transformers passes these named special tokens (plus model-specific `*_token` ones) as template variables.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may arrive under; templates read `reasoning_content` (gpt-oss ones read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (assistant-mask markers) must parse; here the body just renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    # Like transformers: no underscore attributes on namespaces, so templates cannot reach CPython internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot store underscore attribute {name!r}.")


class _TemplateDict:
    # `dict(...)` for templates without exposing the dict type itself.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes `<>&'`; transformers replaces it with plain json.dumps (non-ASCII kept).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types; anything else (an image, an array) becomes "<TypeName>".

    Same rule as transformers' `_plain_template_data`: the sandbox only knows the methods of plain types are safe,
    and templates only test whether media keys exist, so the placeholder changes nothing they render.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():  # numpy scalar
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_message(message: dict) -> dict:
    # apply_chat_template drops None values (OpenAI's content=None), then reasoning is aliased under every name.
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _token_text(value: Any) -> str | None:
    # Special tokens are stored either as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens_from_config(tokenizer_config: dict, special_tokens_map: dict | None = None) -> dict[str, str]:
    """The special-token variables transformers hands every template (bos_token, eos_token, image_token, ...)."""
    config = {**tokenizer_config, **(special_tokens_map or {})}
    tokens = {}
    for key, value in config.items():
        if key in _NAMED_SPECIAL_TOKENS or key.endswith("_token"):
            if (text := _token_text(value)) is not None:
                tokens[key] = text
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # named model-specific tokens join the named map
        tokens.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
    return tokens


def _iterates_content(ast: jinja2.nodes.Template) -> bool:
    """Whether the template loops over a message's `content` (typed parts), or only concatenates it as a string."""
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if isinstance(it, jinja2.nodes.Name) and it.name == "content":
            return True
        if isinstance(it, jinja2.nodes.Getattr) and it.attr == "content":
            return True
        if isinstance(it, jinja2.nodes.Getitem) and isinstance(it.arg, jinja2.nodes.Const) and it.arg.value == "content":
            return True
    return False


class ChatTemplate:
    """A compiled chat template plus the special-token variables its tokenizer would pass."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, *, tool_source: str | None = None):
        env = _make_environment()
        try:
            self._template = env.from_string(source)
            self._tool_template = env.from_string(tool_source) if tool_source is not None else None
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not compile: {e}") from e
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        # 4.6 templates take typed content parts; 4.0/4.5 ones concatenate `message.content` and need a string.
        self.content_format = "list" if _iterates_content(env.parse(source)) else "string"

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatTemplate":
        """Load the template the way transformers' tokenizer does: chat_template.jinja wins over tokenizer_config."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        # transformers reads the legacy special_tokens_map.json only for configs without added_tokens_decoder.
        legacy_map = {} if "added_tokens_decoder" in config else _read_json(folder / "special_tokens_map.json")
        tokens = special_tokens_from_config(config, legacy_map)
        templates = {}
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        for path in sorted((folder / "additional_chat_templates").glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
        if not templates:
            stored = config.get("chat_template")
            if isinstance(stored, list):  # [{"name": ..., "template": ...}, ...]
                templates = {t["name"]: t["template"] for t in stored}
            elif isinstance(stored, str):
                templates = {"default": stored}
        default = templates.get("default", CHATML_TEMPLATE)
        return cls(default, tokens, tool_source=templates.get("tool_use"))

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` to the prompt string. Template kwargs (e.g. enable_thinking=True) override tokens."""
        if not messages:
            raise InputError("messages must not be empty")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise InputError("tools must be JSON-schema dicts")
        if not all(isinstance(m, dict) for m in messages):
            raise InputError("every message must be a dict")
        template = self._tool_template if tools is not None and self._tool_template is not None else self._template
        variables = _plain({**self.special_tokens, **template_kwargs})
        try:
            return template.render(
                messages=[_prepare_message(m) for m in _plain(list(messages))],
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:  # raise_exception() calls and undefined fields: the messages are wrong
            raise InputError(f"chat template rejected the messages: {e}") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
