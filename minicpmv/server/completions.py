"""Engine outputs of one request -> an OpenAI chat completion: SSE chunks while streaming, or
one object at the end. Reasoning goes to `reasoning_content`, tool calls to `tool_calls` (while
streaming: the call's id and name as soon as they are known, then its arguments in pieces), and
`usage` counts exactly the tokens that made the answer (the prompt once; every generated token up
to the stop, across choices)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..output import OutputDecoder
from .jobs import Job
from .logprobs import TokenText
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Choice, ChunkChoice,
                       Delta, FunctionCall, FunctionCallDelta, PromptTokensDetails, ToolCall, ToolCallDelta, Usage)
from .worker import RequestHandle, Worker


class Completion:
    """Drives the decoders of one request's choices from its engine outputs."""

    def __init__(self, worker: Worker, handle: RequestHandle, job: Job, request: ChatCompletionRequest,
                 completion_id: str, model_name: str):
        tokenizer, stop_ids = worker.model.tokenizer, worker.model.family.stop_token_ids
        self.worker, self.handle, self.job, self.request = worker, handle, job, request
        self.id, self.model_name, self.created = completion_id, model_name, int(time.time())
        self.decoders = [OutputDecoder(tokenizer, stop_ids, starts_in_reasoning=job.starts_in_reasoning,
                                       tools=job.tools, stop=job.stop,
                                       unescape_newlines=bool(request.unescape_newlines)) for _ in job.params]
        self.token_text = TokenText(tokenizer) if any(job.logprobs) else None
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
                entry = self._logprob(index, token, decoder)
                got = decoder.feed(token)
                if entry is not None:
                    got = [("logprobs", entry)] + got
                if finished:
                    got += decoder.finish(reason)
                elif decoder.done and not was_done:
                    self.worker.cancel(self.handle, index)  # a stop string ended this choice early
                events.setdefault(index, []).extend(got)
            yield events
            if all(d.done for d in self.decoders):
                return

    def _logprob(self, index: int, token, decoder) -> dict | None:
        """The OpenAI logprobs entry of a token that belongs to the answer (not a stop token, not after a stop
        string), when the request asked for them."""
        recorder = self.job.logprobs[index]
        if recorder is None or token is None or decoder.done or token in decoder.stop_token_ids:
            return None
        taken = recorder.take(decoder.num_tokens, token)  # its position: the tokens before it
        return None if taken is None else self.token_text.entry(token, *taken)

    def usage(self) -> Usage:
        prompt, completion = len(self.job.prompt_ids), sum(d.num_tokens for d in self.decoders)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.handle.cached_tokens))

    # -- one-shot -------------------------------------------------------------------------
    async def collect(self) -> ChatCompletion:
        parts = [{"reasoning": [], "content": [], "tool_call": [], "tool_call_delta": [], "logprobs": []}
                 for _ in self.decoders]
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
            logprobs = {"content": p["logprobs"]} if self.job.logprobs[i] is not None else None
            choices.append(Choice(index=i, message=message, finish_reason=decoder.finish_reason, logprobs=logprobs))
        return ChatCompletion(id=self.id, model=self.model_name, choices=choices, usage=self.usage())

    # -- streaming ------------------------------------------------------------------------
    async def sse(self) -> AsyncIterator[str]:
        yield self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                           for i in range(len(self.decoders))])
        async for events in self.steps():
            choices, finished = [], []
            for index, got in sorted(events.items()):
                delta, entries = Delta(), []
                for kind, value in got:
                    if kind == "logprobs":
                        entries.append(value)
                    elif kind == "tool_call_delta":
                        delta.tool_calls = _add_tool_delta(delta.tool_calls or [], value)
                    elif kind == "tool_call":
                        continue  # already streamed in pieces
                    elif kind == "reasoning":
                        delta.reasoning_content = (delta.reasoning_content or "") + value
                    else:
                        delta.content = (delta.content or "") + value
                if delta.content or delta.reasoning_content or delta.tool_calls or entries:
                    choices.append(ChunkChoice(index=index, delta=delta,
                                               logprobs={"content": entries} if entries else None))
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


def _add_tool_delta(calls: list[ToolCallDelta], piece: dict) -> list[ToolCallDelta]:
    """Fold one parser delta into the chunk's tool_calls: arguments pieces of the same call join up."""
    if "name" in piece:
        return calls + [ToolCallDelta(index=piece["index"], id=piece["id"], type="function",
                                      function=FunctionCallDelta(name=piece["name"], arguments=""))]
    if calls and calls[-1].index == piece["index"]:
        calls[-1].function.arguments = (calls[-1].function.arguments or "") + piece["arguments"]
        return calls
    return calls + [ToolCallDelta(index=piece["index"], function=FunctionCallDelta(arguments=piece["arguments"]))]
