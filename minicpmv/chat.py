"""The Python API: `model = minicpmv.load(...)`, then `model.chat(msgs=[...])` as the model
cards use it. Messages -> family adapter (template, media, placeholders) -> engine -> text,
with the reasoning split off and tool calls parsed."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer

from .engine.beam_search import BeamSearchParams, beam_search
from .engine.config import EngineConfig
from .engine.engine import Engine
from .engine.sampling import SamplingParams
from .engine.sequence import Sequence
from .errors import InputError
from .families import adapter_for
from .output import OutputDecoder


class Reply(str):
    """The answer as a plain string (what the model cards print), carrying the rest:
    `.reasoning` (the thinking, or None), `.content` (= the string itself), `.raw` (every
    generated character, think tags included), `.tool_calls` (OpenAI-style dicts),
    `.finish_reason` ("stop" | "length"), `.usage` (prompt/completion token counts)."""

    reasoning: str | None
    raw: str
    tool_calls: list
    finish_reason: str | None
    usage: dict

    def __new__(cls, content: str, **fields):
        obj = super().__new__(cls, content)
        obj.__dict__.update(fields)
        return obj

    @property
    def content(self) -> str:
        return str(self)


class StreamPiece(str):
    """A piece of streamed text; `.kind` says whether it is "reasoning" or "content" (or
    "tool_call": an empty piece whose `.tool_call` is a whole call)."""

    kind: str
    tool_call: dict | None

    def __new__(cls, text: str, kind: str, tool_call: dict | None = None):
        obj = super().__new__(cls, text)
        obj.kind = kind
        obj.tool_call = tool_call
        return obj


class MiniCPMV:
    def __init__(self, folder: Path, model, config: dict, tokenizer: Tokenizer, family,
                 engine_config: EngineConfig | None = None):
        self.folder = folder
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.family = family
        self.max_context = family.max_context
        self.engine = Engine(model, engine_config or EngineConfig(max_context=self.max_context))

    @classmethod
    def from_parts(cls, folder: Path, model, config: dict, **engine_settings) -> "MiniCPMV":
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        family = adapter_for(folder, config, tokenizer)
        engine_config = EngineConfig(max_context=family.max_context, **engine_settings)
        return cls(folder, model, config, tokenizer, family, engine_config)

    # -- building requests ----------------------------------------------------------------
    def sampling_params(self, max_new_tokens=None, do_sample=None, temperature=None, top_p=None, top_k=None,
                        repetition_penalty=None, seed=None, num_beams=None, **family_kwargs) -> SamplingParams:
        """The checkpoint's generation defaults, overridden by whatever the caller passed. A family
        default (or caller) asking for num_beams > 1 gets BeamSearchParams."""
        d = self.family.generation_defaults(**family_kwargs)
        given = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                     top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, num_beams=num_beams)
        d.update({k: v for k, v in given.items() if v is not None})
        if (max_new_tokens or 0) > self.max_context:
            raise InputError(f"max_new_tokens is {max_new_tokens}, more than the model's context of "
                             f"{self.max_context} tokens (prompt included)")
        if d.get("num_beams", 1) > 1:
            return BeamSearchParams(stop_token_ids=list(self.family.stop_token_ids), **d)
        for key in ("num_beams", "length_penalty", "early_stopping"):
            d.pop(key, None)
        return SamplingParams(stop_token_ids=list(self.family.stop_token_ids), **d)

    def prepare(self, msgs, **options):
        """Messages -> PreparedPrompt (template, media loading, placeholders, token ids)."""
        return self.family.prepare(msgs, **options)

    # -- generation -----------------------------------------------------------------------
    def output_decoder(self, starts_in_reasoning: bool = False, tools: list | None = None,
                       stop: list[str] | None = None) -> OutputDecoder:
        return OutputDecoder(self.tokenizer, self.family.stop_token_ids, starts_in_reasoning=starts_in_reasoning,
                             tools=tools, stop=list(stop or []))

    def generate_events(self, prepared, params: SamplingParams, tools: list | None = None,
                        stop: list[str] | None = None) -> Iterator[tuple[str, object]]:
        """Run one request through the engine; yield output events as they decode (see
        output/decoder.py: ("reasoning" | "content", text), ("tool_call", entry), ...). The
        generator's return value is (finished Sequence, its OutputDecoder). A stop string ends the
        generation there. With num_beams > 1 the beam search runs to the end first."""
        seq = Sequence(prepared.input_ids, params, prepared.vision, position_ids=prepared.position_ids,
                       rope_delta=prepared.rope_delta, reuse_boundary=prepared.reuse_boundary)
        decoder = self.output_decoder(prepared.starts_in_reasoning, tools, stop)
        if getattr(params, "num_beams", 1) > 1:
            beam_search(self.engine, seq)
            for token in seq.output_ids:
                yield from decoder.feed(token)
            yield from decoder.finish(seq.finish_reason)
            return seq, decoder
        self.engine.add(seq)
        try:
            while not seq.finished and not decoder.done:
                for out in self.engine.step():
                    if out.seq is seq and out.token_id is not None:
                        yield from decoder.feed(out.token_id)
            if seq.error is not None:
                raise seq.error
            yield from decoder.finish(seq.finish_reason)
            return seq, decoder
        finally:
            self.engine.abort(seq)  # no-op when finished; frees the state after a stop string or an early exit

    def reply_for(self, seq: Sequence, starts_in_reasoning: bool = False, tools: list | None = None,
                  stop: list[str] | None = None) -> Reply:
        """A finished Sequence -> Reply, through the same output pipeline as a stream."""
        decoder = self.output_decoder(starts_in_reasoning, tools, stop)
        events = [e for token in seq.output_ids for e in decoder.feed(token)]
        events += decoder.finish(seq.finish_reason or "stop")
        return self._reply(seq, decoder, events)

    def _reply(self, seq: Sequence, decoder: OutputDecoder, events: list) -> Reply:
        text = {"reasoning": [], "content": []}
        tool_calls = []
        for kind, value in events:
            if kind in text:
                text[kind].append(value)
            elif kind == "tool_call":
                tool_calls.append(value)
        stops = set(seq.params.stop_token_ids)
        answered = seq.output_ids[:decoder.num_tokens]  # a stop string may have ended the answer early
        raw = self.tokenizer.decode([t for t in answered if t not in stops], skip_special_tokens=False)
        usage = {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(answered),
                 "total_tokens": len(seq.prompt_ids) + len(answered), "cached_tokens": seq.num_cached}
        return Reply("".join(text["content"]), reasoning="".join(text["reasoning"]) if text["reasoning"] else None,
                     raw=raw, tool_calls=tool_calls, finish_reason=decoder.finish_reason, usage=usage)

    def chat(self, msgs=None, image=None, tokenizer=None, processor=None, *, messages=None, stream: bool = False,
             max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, num_beams: int | None = None, tools: list | None = None,
             stop: list[str] | None = None, **options):
        """Chat as the model cards do. `msgs`: [{"role": "user", "content": [image, "question"]}, ...]
        (PIL images, paths, URLs, bytes; OpenAI-style typed items work too). `image`: an image to
        put before the first user text, as the remote code's legacy argument does.

        Returns a `Reply` (a str: the answer; `.reasoning`, `.raw`, `.tool_calls`, `.usage`), or with
        stream=True an iterator of `StreamPiece`s (str with `.kind` "reasoning" / "content", or an
        empty "tool_call" piece carrying `.tool_call`, a whole OpenAI-style call). `stop`: strings
        that end the answer (not included), as OpenAI's `stop`.

        Options (per call; defaults come from the checkpoint): enable_thinking, system_prompt,
        max_slice_nums, use_image_id, downsample_mode ("16x"/"4x"), max_num_frames, stack_frames,
        max_pixels; sampling: do_sample (False = greedy), temperature, top_p, top_k,
        repetition_penalty, seed, max_new_tokens, num_beams (> 1 = beam search; 4.0/4.5's
        sampling=False defaults to 3 beams as their remote code)."""
        msgs = messages if messages is not None else msgs
        if msgs is None:
            raise TypeError("chat() needs msgs=[{'role': 'user', 'content': [...]}]")
        if isinstance(msgs, str):
            msgs = json.loads(msgs)
        if image is not None:
            msgs = _with_leading_image(msgs, image)
        sampling_keys = self.family.sampling_option_names
        family_sampling = {k: options.pop(k) for k in list(options) if k in sampling_keys}
        params = self.sampling_params(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty,
                                      seed, num_beams, **family_sampling)
        prepared = self.prepare(msgs, tools=tools, **options)
        events = self.generate_events(prepared, params, tools, stop)
        if stream:
            return _stream_pieces(events)
        return self._collect(events)

    def _collect(self, events) -> Reply:
        collected = []
        while True:  # drain the stream; (Sequence, decoder) is the generator's return value
            try:
                collected.append(next(events))
            except StopIteration as stop:
                seq, decoder = stop.value
                return self._reply(seq, decoder, collected)


def _stream_pieces(events) -> Iterator["StreamPiece"]:
    for kind, value in events:
        if kind in ("reasoning", "content"):
            yield StreamPiece(value, kind)
        elif kind == "tool_call":
            yield StreamPiece("", "tool_call", tool_call=value)


def _with_leading_image(msgs: list, image) -> list:
    """The remote code's `chat(image=..., msgs=...)`: the image goes first in the first user turn."""
    msgs = [dict(m) for m in msgs]
    for m in msgs:
        if m.get("role") == "user":
            content = m["content"]
            m["content"] = [image] + (list(content) if isinstance(content, list) else [content])
            break
    return msgs
