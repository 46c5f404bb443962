"""A validated request -> a Job the engine thread can run: vetted media, the rendered and
tokenized prompt with its vision inputs, and one SamplingParams per choice.

Everything here may block (downloads, image decoding, slicing, hashing pixels), so it runs on
a small thread pool: never on the event loop, and not on the engine thread, which keeps
decoding the running sequences meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.encoder_cache import content_key
from ..engine.sampling import SamplingParams
from ..errors import InputError, PromptTooLongError
from .constrained import GrammarFactory
from .logprobs import LogprobRecorder
from .protocol import ChatCompletionRequest
from .tool_choice import chosen_function, tool_call_grammar

TEMPLATE_KWARGS = ("enable_thinking",)
# prepare() arguments a client must not set through mm_processor_kwargs: the pixel limit is the
# operator's, the rest have their own request fields.
RESERVED = ("max_pixels", "tools", "enable_thinking", "system_prompt", "msgs")


@dataclass
class Job:
    prompt_ids: list[int]
    vision: list
    starts_in_reasoning: bool
    params: list[SamplingParams]  # one per choice
    tools: list[dict] | None
    stop: list[str]
    position_ids: object = None  # multi-axis RoPE positions of the prompt (4.7), else None
    rope_delta: int = 0
    reuse_boundary: int | None = None  # where the engine keeps state for the next turn
    pixels: int = 0  # media pixels reserved from the server's in-flight budget
    logprobs: list = field(default_factory=list)  # per choice: its LogprobRecorder, or None


def build_job(model, request: ChatCompletionRequest, messages: list[dict], grammars: GrammarFactory | None,
              max_image_pixels: int) -> Job:
    """`messages`: the request's messages with their media vetted (MediaPolicy)."""
    tools = None
    if request.tools and request.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in request.tools]
    template_kwargs = dict(request.chat_template_kwargs or {})
    unknown = sorted(set(template_kwargs) - set(TEMPLATE_KWARGS))
    if unknown:
        raise InputError(f"chat_template_kwargs: unknown key(s) {unknown}; supported: {list(TEMPLATE_KWARGS)}")
    if not isinstance(template_kwargs.get("enable_thinking", False), bool):
        raise InputError("chat_template_kwargs.enable_thinking must be true or false")
    media = request.media_options()
    reserved = sorted(set(media) & set(RESERVED))
    if reserved:
        raise InputError(f"mm_processor_kwargs: {reserved} cannot be set per request")
    try:
        prepared = model.prepare(messages, tools=tools, max_pixels=max_image_pixels, **template_kwargs, **media)
    except TypeError as e:  # the family adapter names the options it takes
        if "unknown option" not in str(e) and "unexpected keyword argument" not in str(e):
            raise
        raise InputError(f"{model.family.name}: {e}") from e
    n = len(prepared.input_ids)
    if n >= model.max_context:
        raise PromptTooLongError(f"the prompt is {n} tokens (text and vision placeholders) but the model's context "
                                 f"is {model.max_context} tokens; shorten the text, send fewer/smaller images or "
                                 f"frames, or lower max_slice_nums")
    for v in prepared.vision:
        v.cache_key = content_key(v)  # hashed here, off the engine thread
    constraint = _tool_constraint(request, tools, grammars) or request.constraint()
    params = [_sampling(model, request, i, grammars, constraint, prepared.starts_in_reasoning)
              for i in range(request.n)]
    recorders = [LogprobRecorder(request.top_logprobs or 0) if request.logprobs else None for _ in params]
    for p, recorder in zip(params, recorders):
        if recorder is not None:
            p.logits_processors.insert(0, recorder)  # first: it sees the model's own logits
    return Job(prepared.input_ids, prepared.vision, prepared.starts_in_reasoning, params, tools, request.stop or [],
               prepared.position_ids, prepared.rope_delta, prepared.reuse_boundary, logprobs=recorders)


def _tool_constraint(request: ChatCompletionRequest, tools: list[dict] | None, grammars) -> tuple[str, str] | None:
    """tool_choice "required" / a named function -> a grammar for the calls (tool_choice.py)."""
    if not tools or (request.tool_choice != "required" and not isinstance(request.tool_choice, dict)):
        return None
    name = chosen_function(request.tool_choice, tools)
    tag_is_token = grammars is not None and grammars.is_token("<tool_call>")
    return "lark", tool_call_grammar(tools, name, tag_is_token, parallel=request.parallel_tool_calls is not False)


def _sampling(model, request: ChatCompletionRequest, index: int, grammars, constraint,
              starts_in_reasoning) -> SamplingParams:
    top_k = request.top_k if request.top_k is None else max(request.top_k, 0)
    do_sample = None if request.temperature is None else request.temperature > 0
    seed = None if request.seed is None else request.seed + index  # n choices: distinct, reproducible
    try:
        params = model.sampling_params(request.max_new_tokens, do_sample, request.temperature, request.top_p, top_k,
                                       request.repetition_penalty, seed)
    except ValueError as e:
        raise InputError(str(e)) from e
    if request.ignore_eos:
        params.stop_token_ids = []
    # knobs the engine's sampler has but the checkpoint defaults do not name (ranges checked by the protocol)
    params.presence_penalty = request.presence_penalty or 0.0
    params.frequency_penalty = request.frequency_penalty or 0.0
    params.min_p = request.min_p or 0.0
    if constraint is not None:
        if grammars is None:
            raise InputError("constrained output needs llguidance, which is not installed on this server")
        params.logits_processors.append(grammars.processor(*constraint, starts_in_reasoning))
    return params
