"""One chat turn for the terminal: messages -> engine -> streamed pieces -> Reply, with the
prompt checks the terminal user should see (long prompts, cut answers) as notes on stderr."""
from __future__ import annotations

import warnings

from .errors import CliError

MEDIA_FLAGS = {"max_slice_nums": "max_slice_nums", "downsample_mode": "downsample_mode", "max_frames": "max_num_frames",
               "stack_frames": "stack_frames", "fps": "fps",
               "max_inp_length": "max_inp_length"}


def media_options(args) -> dict:
    return {key: getattr(args, flag) for flag, key in MEDIA_FLAGS.items() if getattr(args, flag, None) is not None}


def sampling_params(model, args):
    greedy = args.greedy or args.temperature == 0
    return model.sampling_params(max_new_tokens=args.max_new_tokens, do_sample=False if greedy else None,
                                 temperature=None if args.temperature == 0 else args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def prepare(model, msgs, args, think: bool, err):
    """Messages -> PreparedPrompt; the processor's warnings (a 4.0/4.5 prompt cut to its
    max_inp_length) become `warning:` lines; a prompt over the context is an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = model.prepare(msgs, enable_thinking=think, system_prompt=args.system,
                                 **media_options(args))
    for w in caught:
        print(f"warning: {w.message}", file=err, flush=True)
    n = len(prepared.input_ids)
    if n >= model.max_context:
        raise CliError(f"the prompt is {n} tokens (text and vision) but the model's context is {model.max_context}",
                       "shorten it, send fewer or smaller images, or lower --max-slice-nums / --max-frames")
    room = model.max_context - n
    if args.max_new_tokens > room:
        print(f"warning: only {room} tokens of context are left after the {n}-token prompt; the answer stops there "
              f"even though --max-new-tokens is {args.max_new_tokens}", file=err, flush=True)
    return prepared


def drain(pieces, on_piece=None):
    """Run the pieces generator to its end, calling on_piece(kind, text); returns the Sequence."""
    while True:
        try:
            kind, text = next(pieces)
        except StopIteration as stop:
            return stop.value
        if on_piece is not None:
            on_piece(kind, text)


def finish_note(reply, max_new_tokens: int) -> str | None:
    """Why an answer ended early, in words, or None when it ended normally."""
    if reply.finish_reason != "length":
        return None
    if reply.reasoning is not None and not reply.content.strip():
        return (f"note: the model was still thinking when it reached --max-new-tokens {max_new_tokens}, so there is "
                f"no answer (finish_reason: length); raise --max-new-tokens, or drop --think")
    return (f"note: the answer was cut at --max-new-tokens {max_new_tokens} (finish_reason: length); raise "
            f"--max-new-tokens for the rest")


def reply_json(reply) -> dict:
    return {"text": reply.content, "reasoning": reply.reasoning, "tool_calls": reply.tool_calls,
            "usage": reply.usage, "finish_reason": reply.finish_reason}
