"""The OpenAI chat-completions wire format (plus vLLM's extra knobs) as pydantic models.

Requests are lenient where OpenAI and vLLM are: an unknown field is ignored, and fields that change
nothing here (user, store, metadata, prompt_cache_key, safety_identifier, service_tier,
parallel_tool_calls) are accepted. A known field whose meaning we cannot honour (logit_bias,
vLLM's old guided_* names...) is a 400 naming it rather than a silently different answer. Numbers must be finite; every sampling value is range-checked here, before any work.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine.sampling import SEED_MAX
from .tool_choice import chosen_function

# Per-request preprocessing knobs accepted at the top level and in mm_processor_kwargs; they go
# to the family adapter as they are, and one the family does not know is a 400.
MEDIA_FIELDS = ("max_slice_nums", "downsample_mode", "use_image_id", "fps", "max_num_frames", "stack_frames",
                "packing")
SEED_MIN = 0  # the engine seeds a torch generator: [0, 2**64 - 1]

# Fields outside this API's model that would change the answer: refused unless left neutral.
# field -> (neutral values, what to use instead)
REFUSED = {
    "logit_bias": ((None, {}), "it is not supported"),
    "best_of": ((None, 1), "use n"),
    "min_tokens": ((None, 0), "it is not supported"),
    "echo": ((None, False), "it is not supported"),
    "functions": ((None, []), "use tools"),
    "function_call": ((None, "none", "auto"), "use tool_choice"),
    "guided_json": ((None,), "use response_format or structured_outputs.json"),
    "guided_regex": ((None,), "use structured_outputs.regex"),
    "guided_choice": ((None,), "use structured_outputs.choice"),
    "guided_grammar": ((None,), "use structured_outputs.grammar"),
    "prediction": ((None,), "it is not supported"),
    "audio": ((None,), "this model has no audio output"),
    "modalities": ((None, ["text"]), "this model answers in text only"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionDef(Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class JsonSchemaFormat(Lenient):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a 'json_schema' object with a 'schema'")
        return self


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: exactly one of a regex, a list of choices, a JSON schema or a
    Lark grammar (llguidance's dialect: `<|im_end|>`-style names match special tokens)."""

    regex: str | None = None
    choice: list[str] | None = None
    json_: dict[str, Any] | None = Field(None, alias="json")
    grammar: str | None = None

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.regex, self.choice, self.json_, self.grammar)) != 1:
            raise ValueError("give exactly one of 'regex', 'choice', 'json' or 'grammar'")
        return self


class MediaOptions(BaseModel):
    """Typed checks for the knobs this project knows; other keys pass through to the family."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    max_slice_nums: int | None = Field(None, ge=1)
    downsample_mode: Literal["16x", "4x"] | None = None
    use_image_id: bool | None = None
    fps: float | None = Field(None, gt=0)
    max_num_frames: int | None = Field(None, ge=1)
    stack_frames: int | None = Field(None, ge=1)
    packing: int | None = Field(None, ge=1)


class ChatCompletionRequest(Lenient):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # extras kept only to refuse REFUSED ones

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM spells "off" -1)
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's knob; 0: off
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    ignore_eos: bool = False  # vLLM's knob: generate exactly max_tokens (benchmarks, load tests)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    max_slice_nums: int | None = None
    downsample_mode: str | None = None
    use_image_id: bool | None = None
    fps: float | None = None
    max_num_frames: int | None = None
    stack_frames: int | None = None
    packing: int | None = None
    # ours: show escaped newlines (a literal backslash-n) as newlines, outside code and math
    # (minicpmv/newlines.py); None = the server's --unescape-newlines default (off)
    unescape_newlines: bool | None = None
    # OpenAI fields with no effect here (accepted, ignored)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in REFUSED and value not in REFUSED[name][0]:
                raise ValueError(f"'{name}' is not supported by this server: {REFUSED[name][1]}")
        if self.structured_outputs and self.response_format and self.response_format.type != "text":
            raise ValueError("response_format and structured_outputs: give one of them, not both")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:
            raise ValueError(f"seed + n - 1 must be at most {SEED_MAX} (each choice samples with seed + its index)")
        if self.tool_choice == "required" or isinstance(self.tool_choice, dict):
            if not self.tools:
                raise ValueError("tool_choice 'required' or a named function needs 'tools'")
            if self.constraint() is not None:
                raise ValueError("tool_choice 'required' or a named function cannot be combined with "
                                 "response_format or structured_outputs")
            chosen_function(self.tool_choice, [t.model_dump() for t in self.tools])
        return self

    def media_options(self) -> dict[str, Any]:
        merged = dict(self.mm_processor_kwargs or {})
        merged.update({k: getattr(self, k) for k in MEDIA_FIELDS if getattr(self, k) is not None})
        return MediaOptions.model_validate(merged).model_dump(exclude_none=True)

    def constraint(self) -> tuple[str, Any] | None:
        """("json", schema) | ("regex", pattern) | ("lark", grammar) | None: what decoding must follow."""
        fmt, so = self.response_format, self.structured_outputs
        if fmt is not None and fmt.type == "json_object":
            return "json", {"type": "object"}
        if fmt is not None and fmt.type == "json_schema":
            return "json", fmt.json_schema.schema_
        if so is not None and so.regex is not None:
            return "regex", so.regex
        if so is not None and so.choice is not None:
            return "regex", "|".join(re.escape(c) for c in so.choice)
        if so is not None and so.grammar is not None:
            return "lark", so.grammar
        if so is not None:
            return "json", so.json_
        return None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """Streaming: the first delta of a call has its id, type and name (arguments ""), the next ones
    arguments pieces whose concatenation is the call's `arguments`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class Choice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minicpmv"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
