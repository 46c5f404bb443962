"""Engine outputs of one request -> an OpenAI chat completion: SSE chunks while streaming, or
one object at the end. Reasoning goes to `reasoning_content`, tool calls to `tool_calls` (one
delta per call, sent whole once its closing tag arrives), and `usage` counts exactly the tokens
that made the answer (the prompt once; every generated token up to the stop, across choices)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .choice import ChoiceDecoder
from .jobs import Job
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Choice, ChunkChoice,
                       Delta, FunctionCall, ToolCall, ToolCallDelta, Usage)
from .worker import RequestHandle, Worker


class Completion:
    """Drives the decoders of one request's choices from its engine outputs."""

    def __init__(self, worker: Worker, handle: RequestHandle, job: Job, request: ChatCompletionRequest,
                 completion_id: str, model_name: str):
        tokenizer, stop_ids = worker.model.tokenizer, worker.model.family.stop_token_ids
        self.worker, self.handle, self.job, self.request = worker, handle, job, request
        self.id, self.model_name, self.created = completion_id, model_name, int(time.time())
        self.decoders = [ChoiceDecoder(tokenizer, stop_ids, starts_in_reasoning=job.starts_in_reasoning,
                                       tools=job.tools, stop=job.stop,
                                       unescape_newlines=bool(request.unescape_newlines)) for _ in job.params]
        self._reported: set[int] = set()  # choices whose finish_reason chunk was sent
        self.ended = False  # the server has released this request (streaming)

    async def steps(self) -> AsyncIterator[dict[int, list]]:
        """Per engine step: {choice index: events}; ends when every choice is done."""
        async for items in self.handle.outputs():
            if self.handle.first_token_at is None:
                self.handle.first_token_at = time.monotonic()
                self.worker.metrics.first_token(self.handle.first_token_at - self.handle.arrival)
            events: dict[int, list] = {}
            for index, token, finished, reason in items:
                decoder = self.decoders[index]
                was_done = decoder.done
                got = decoder.feed(token)
                if finished:
                    got += decoder.finish(reason)
                elif decoder.done and not was_done:
                    self.worker.cancel(self.handle, index)  # a stop string ended this choice early
                events.setdefault(index, []).extend(got)
            yield events
            if all(d.done for d in self.decoders):
                return

    def usage(self) -> Usage:
        prompt, completion = len(self.job.prompt_ids), sum(d.num_tokens for d in self.decoders)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # -- one-shot -------------------------------------------------------------------------
    async def collect(self) -> ChatCompletion:
        parts = [{"reasoning": [], "content": [], "tool_call": []} for _ in self.decoders]
        async for events in self.steps():
            for index, got in events.items():
                for kind, value in got:
                    parts[index][kind].append(value)
        choices = []
        for i, (decoder, p) in enumerate(zip(self.decoders, parts)):
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in p["tool_call"]]
            content = "".join(p["content"])
            message = ChatMessage(content=content or (None if calls else ""),
                                  reasoning_content="".join(p["reasoning"]) or None, tool_calls=calls)
            choices.append(Choice(index=i, message=message, finish_reason=decoder.finish_reason))
        return ChatCompletion(id=self.id, model=self.model_name, choices=choices, usage=self.usage())

    # -- streaming ------------------------------------------------------------------------
    async def sse(self) -> AsyncIterator[str]:
        n_calls = [0] * len(self.decoders)
        yield self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                           for i in range(len(self.decoders))])
        async for events in self.steps():
            choices, finished = [], []
            for index, got in sorted(events.items()):
                delta = Delta()
                for kind, value in got:
                    if kind == "tool_call":
                        call = ToolCallDelta(index=n_calls[index], id=value["id"],
                                             function=FunctionCall(**value["function"]))
                        delta.tool_calls = (delta.tool_calls or []) + [call]
                        n_calls[index] += 1
                    elif kind == "reasoning":
                        delta.reasoning_content = (delta.reasoning_content or "") + value
                    else:
                        delta.content = (delta.content or "") + value
                if delta.content or delta.reasoning_content or delta.tool_calls:
                    choices.append(ChunkChoice(index=index, delta=delta))
                if self.decoders[index].done and self._just_finished(index):
                    finished.append(ChunkChoice(index=index, delta=Delta(),
                                                finish_reason=self.decoders[index].finish_reason))
            for group in (choices, finished):  # the last text first, then the finish reasons
                if group:
                    yield self._chunk(group)
        options = self.request.stream_options
        if options is not None and options.include_usage:
            yield self._chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"

    def _just_finished(self, index: int) -> bool:
        """True once per choice: the step where it finished."""
        if index in self._reported:
            return False
        self._reported.add(index)
        return True

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model_name, choices=choices,
                                    usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
