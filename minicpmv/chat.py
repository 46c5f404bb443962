"""The Python API: `model = minicpmv.load(...)`, then `model.chat(msgs=[...])` as the model
cards use it. Messages -> family adapter (template, media, placeholders) -> engine -> text,
with the reasoning split off and tool calls parsed."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from .engine.beam_search import BeamSearchParams, beam_search
from .engine.engine import Engine
from .engine.sampling import SamplingParams
from .engine.sequence import Sequence
from .families import adapter_for
from .prompt.detokenizer import IncrementalDetokenizer
from .prompt.reasoning import ReasoningStreamParser, split_reasoning
from .prompt.tool_calls import parse_tool_calls


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
    """A piece of streamed text; `.kind` says whether it is "reasoning" or "content"."""

    kind: str

    def __new__(cls, text: str, kind: str):
        obj = super().__new__(cls, text)
        obj.kind = kind
        return obj


@dataclass
class GenerationResult:
    seq: Sequence
    raw: str
    pieces: list = field(default_factory=list)


class MiniCPMV:
    def __init__(self, folder: Path, model, config: dict, tokenizer: Tokenizer, family):
        self.folder = folder
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.family = family
        self.max_context = family.max_context
        self.engine = Engine(model, self.max_context)

    @classmethod
    def from_parts(cls, folder: Path, model, config: dict) -> "MiniCPMV":
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        return cls(folder, model, config, tokenizer, adapter_for(folder, config, tokenizer))

    # -- building requests ----------------------------------------------------------------
    def sampling_params(self, max_new_tokens=None, do_sample=None, temperature=None, top_p=None, top_k=None,
                        repetition_penalty=None, seed=None, num_beams=None, **family_kwargs) -> SamplingParams:
        """The checkpoint's generation defaults, overridden by whatever the caller passed. A family
        default (or caller) asking for num_beams > 1 gets BeamSearchParams."""
        d = self.family.generation_defaults(**family_kwargs)
        given = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                     top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, num_beams=num_beams)
        d.update({k: v for k, v in given.items() if v is not None})
        if d.get("num_beams", 1) > 1:
            return BeamSearchParams(stop_token_ids=list(self.family.stop_token_ids), **d)
        for key in ("num_beams", "length_penalty", "early_stopping"):
            d.pop(key, None)
        return SamplingParams(stop_token_ids=list(self.family.stop_token_ids), **d)

    def prepare(self, msgs, **options):
        """Messages -> PreparedPrompt (template, media loading, placeholders, token ids)."""
        return self.family.prepare(msgs, **options)

    # -- generation -----------------------------------------------------------------------
    def generate_pieces(self, prepared, params: SamplingParams) -> Iterator[tuple[str, str]]:
        """Run one request through the engine; yield (kind, text) pieces as they decode, where
        kind is "reasoning" or "content". The finished Sequence is returned by the generator.
        With num_beams > 1 the beam search runs to the end first, then its text comes in one go."""
        seq = Sequence(prompt_ids=prepared.input_ids, params=params, vision=prepared.vision)
        parser = ReasoningStreamParser(in_reasoning=prepared.starts_in_reasoning)
        stop_ids = set(params.stop_token_ids)
        if getattr(params, "num_beams", 1) > 1:
            beam_search(self.engine, seq)
            yield from parser.feed(self.tokenizer.decode([t for t in seq.output_ids if t not in stop_ids],
                                                         skip_special_tokens=False))
            yield from parser.flush()
            return seq
        self.engine.add(seq)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=False)
        try:
            while True:
                for out in self.engine.step():
                    if out.seq is not seq:
                        continue
                    if out.token_id not in stop_ids:
                        text = detok.add(out.token_id)
                        if text:
                            yield from parser.feed(text)
                    if out.finished:
                        yield from parser.feed(detok.flush())
                        yield from parser.flush()
                        return seq
        finally:
            self.engine.abort(seq)  # no-op when finished; frees the slot if the caller stopped early

    def chat(self, msgs=None, image=None, tokenizer=None, processor=None, *, messages=None, stream: bool = False,
             max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, num_beams: int | None = None, tools: list | None = None, **options):
        """Chat as the model cards do. `msgs`: [{"role": "user", "content": [image, "question"]}, ...]
        (PIL images, paths, URLs, bytes; OpenAI-style typed items work too). `image`: an image to
        put before the first user text, as the remote code's legacy argument does.

        Returns a `Reply` (a str: the answer; `.reasoning`, `.raw`, `.tool_calls`, `.usage`), or with
        stream=True an iterator of `StreamPiece`s (str with `.kind` "reasoning" / "content").

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
        pieces = self.generate_pieces(prepared, params)
        if stream:
            return (StreamPiece(text, kind) for kind, text in pieces)
        return self._collect(pieces, prepared, tools)

    def _collect(self, pieces, prepared, tools) -> Reply:
        while True:  # drain the stream; the finished Sequence is the generator's return value
            try:
                next(pieces)
            except StopIteration as stop:
                seq = stop.value
                break
        return self.reply_for(seq, prepared.starts_in_reasoning, tools)

    def reply_for(self, seq: Sequence, starts_in_reasoning: bool = False, tools: list | None = None) -> Reply:
        """A finished Sequence -> Reply (text, reasoning, tool calls, usage, finish reason)."""
        stops = set(seq.params.stop_token_ids)
        raw = self.tokenizer.decode([t for t in seq.output_ids if t not in stops], skip_special_tokens=False)
        reasoning, content = split_reasoning(raw, in_reasoning=starts_in_reasoning)
        tool_calls = []
        if tools:
            content, tool_calls = parse_tool_calls(content, tools)
            content = content or ""
        usage = {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.output_ids),
                 "total_tokens": len(seq.prompt_ids) + len(seq.output_ids)}
        return Reply(content, reasoning=reasoning, raw=raw, tool_calls=tool_calls, finish_reason=seq.finish_reason,
                     usage=usage)


def _with_leading_image(msgs: list, image) -> list:
    """The remote code's `chat(image=..., msgs=...)`: the image goes first in the first user turn."""
    msgs = [dict(m) for m in msgs]
    for m in msgs:
        if m.get("role") == "user":
            content = m["content"]
            m["content"] = [image] + (list(content) if isinstance(content, list) else [content])
            break
    return msgs
