"""`minicpmv chat`: one question (streamed, or as JSON), or an interactive session without one."""
from __future__ import annotations

import argparse
import json
import sys

from .common import add_model_args, check_model_args, load_model
from .display import Display
from .errors import CliError
from .generate import drain, finish_note, prepare, reply_json, sampling_params
from .preflight import check_family_options, check_media, check_sampling, read_prompt

EPILOG = """examples:
  minicpmv chat --image cat.jpg "What is in this picture?"
  minicpmv chat --model ./MiniCPM-V-4.6 --image a.png --image b.png "Compare the two images."
  minicpmv chat --video clip.mp4 --fps 2 --max-frames 64 "What happens in the video?"
  minicpmv chat --think --max-new-tokens 4096 "Prove that there are infinitely many primes."
  cat question.txt | minicpmv chat -            (the prompt from stdin; @question.txt reads a file)
  minicpmv chat --json --image cat.jpg "Describe it." (text, reasoning, tool_calls, usage, finish_reason)
  minicpmv chat --model ./MiniCPM-V-4.6         (no prompt: an interactive session)

--model takes a Hugging Face hub id (downloaded once, then read from the local cache) or a
local checkpoint folder (config.json, *.safetensors, tokenizer.json). Without network, run
`minicpmv download ID` where there is network and pass the folder it prints."""


def add_chat_parser(sub, parents) -> None:
    p = sub.add_parser("chat", parents=parents, help="ask about images/videos (streamed), or chat interactively",
                       description="Ask one question about zero or more images and videos; the answer streams to "
                                   "stdout (the thinking, if on, dimmed on stderr). Without a question: an "
                                   "interactive session.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?",
                   help="the question; '-' reads it from stdin, '@FILE' from a file; none: interactive session")
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image (path, file:// or http(s) URL, data URL); repeat for several")
    p.add_argument("--video", action="append", default=[], metavar="PATH_OR_URL",
                   help="a video file (path or URL); repeat for several")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--think", action="store_true", help="turn thinking on (4.5, 4.6, 4.7; enable_thinking=True)")
    p.add_argument("--max-new-tokens", type=int, default=2048,
                   help="most tokens to generate, thinking included (default 2048)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: the checkpoint's)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--max-slice-nums", type=int, help="most slices per image (default: preprocessor_config.json)")
    p.add_argument("--downsample-mode", choices=["16x", "4x"],
                   help="4.6/4.7 only: vision tokens 16x (default) or 4x more")
    p.add_argument("--fps", type=float, help="video frames sampled per second (4.5, 4.6, 4.7)")
    p.add_argument("--max-frames", "--max-num-frames", dest="max_frames", type=int,
                   help="most video frames sampled")
    p.add_argument("--max-inp-length", type=int,
                   help="4.0/4.5 only: prompts are cut to this many tokens, with a warning (default 8192 / 16384)")
    p.add_argument("--stack-frames", type=int, help="4.6/4.7 only: frames per second stacked into one composite")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, reasoning, tool_calls, usage, finish_reason), no streaming")
    p.add_argument("--raw", action="store_true",
                   help="print exactly what the model wrote (by default an escaped newline, a literal backslash-n "
                        "outside code and math, is shown as a line break)")
    p.add_argument("--quiet", action="store_true", help="no loading messages or progress bar")
    p.set_defaults(func=run_chat)


def run_chat(args) -> int:
    check_sampling(args)
    for kind in ("image", "video"):
        for source in getattr(args, kind):
            check_media(kind, source)
    question = read_prompt(args.question, sys.stdin)
    if question is None and args.json:
        raise CliError("--json needs a question", "pass one, or '-' to read it from stdin")
    info = check_model_args(args)
    check_family_options(info, downsample_mode=args.downsample_mode, stack_frames=args.stack_frames,
                         think=args.think, fps=args.fps, max_inp_length=args.max_inp_length)
    model = load_model(info, args, progress=not args.quiet)
    media = [*({"type": "image", "image": i} for i in args.image), *({"type": "video", "video": v} for v in args.video)]
    if question is None:
        from .interactive import Session

        return Session(model, args, media).run()
    msgs = [{"role": "user", "content": [*media, question]}]
    prepared = prepare(model, msgs, args, args.think, sys.stderr)
    events = model.generate_events(prepared, sampling_params(model, args))
    if args.json:
        reply = model.reply_for(drain(events), prepared.starts_in_reasoning)
        print(json.dumps(reply_json(reply), ensure_ascii=False))
        return 0
    display = Display(sys.stdout, sys.stderr, dim=sys.stderr.isatty(), raw=args.raw)
    reply = model.reply_for(drain(events, display.write), prepared.starts_in_reasoning)
    display.close()
    note = finish_note(reply, args.max_new_tokens)
    if note:
        print(note, file=sys.stderr)
    return 0
