"""The `minicpmv` command: chat about images and videos from the terminal (more subcommands
register themselves here as they land: serve, quantize)."""
from __future__ import annotations

import argparse
import sys

from .hub import DEFAULT_MODEL

EPILOG = """examples:
  minicpmv chat --image cat.jpg "What is in this picture?"
  minicpmv chat --model ./MiniCPM-V-4.6 --image a.png --image b.png "Compare the two images."
  minicpmv chat --video clip.mp4 --max-num-frames 64 "What happens in the video?"
  minicpmv chat --think "Prove that there are infinitely many primes."

--model takes a Hugging Face hub id (downloaded once, then read from the local cache) or a
local checkpoint folder (config.json, *.safetensors, tokenizer files). Without network, pass
the folder of a checkpoint you downloaded elsewhere."""


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="ask one question about images/videos, streaming the answer",
                       description="Ask one question about zero or more images and videos; the answer streams "
                                   "to the terminal (the thinking, if on, is shown dimmed on stderr).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", help="the question or instruction")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/compute dtype (auto: float32 on CPU for models up to 4B parameters, else bfloat16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image (path, http(s) URL or data URL); repeat for several")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file; repeat for several")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--think", action="store_true", help="turn thinking on (enable_thinking=True)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="most tokens to generate (default 2048)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: generation_config.json)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--max-slice-nums", type=int, help="most slices per image (default: preprocessor_config.json)")
    p.add_argument("--downsample-mode", choices=["16x", "4x"], help="4.6 vision tokens: 16x (default) or 4x more")
    p.add_argument("--max-num-frames", type=int, help="most video frames sampled (4.6: 1 fps up to this)")
    p.add_argument("--stack-frames", type=int, help="4.6: frames per second stacked into one composite (default 1)")
    p.add_argument("--raw", action="store_true",
                   help="print exactly what the model wrote (by default an escaped newline, a literal backslash-n "
                        "outside code and math, is shown as a line break)")
    p.set_defaults(func=run_chat)


def run_chat(args) -> int:
    import minicpmv

    model = minicpmv.load(args.model, dtype=args.dtype, device=args.device)
    content = [*({"type": "image", "image": i} for i in args.image),
               *({"type": "video", "video": v} for v in args.video), args.question]
    options = {"max_slice_nums": args.max_slice_nums, "downsample_mode": args.downsample_mode,
               "max_num_frames": args.max_num_frames, "stack_frames": args.stack_frames}
    stream = model.chat(msgs=[{"role": "user", "content": content}], stream=True, enable_thinking=args.think,
                        system_prompt=args.system, max_new_tokens=args.max_new_tokens,
                        do_sample=False if args.greedy else None, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, **{k: v for k, v in options.items() if v is not None})
    show = Display(dim=sys.stderr.isatty(), raw=args.raw)
    for piece in stream:
        show.write(piece.kind, str(piece))
    show.close()
    return 0


class Display:
    """The terminal side of a streamed answer: reasoning (dimmed) on stderr, the answer on stdout,
    escaped newlines shown as line breaks unless raw (minicpmv/newlines.py)."""

    def __init__(self, dim: bool, raw: bool):
        from .newlines import NewlineUnescaper

        self.dim = dim
        self.unescapers = None if raw else {"reasoning": NewlineUnescaper(), "content": NewlineUnescaper()}

    def write(self, kind: str, text: str) -> None:
        if self.unescapers is not None:
            text = self.unescapers[kind].feed(text)
        if not text:
            return
        if kind == "reasoning":
            sys.stderr.write(f"\033[2m{text}\033[0m" if self.dim else text)
            sys.stderr.flush()
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def close(self) -> None:
        if self.unescapers is not None:
            tails = [(kind, stream.flush()) for kind, stream in self.unescapers.items()]
            self.unescapers = None
            for kind, rest in tails:
                self.write(kind, rest)
        sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicpmv",
        description="minicpmv: run MiniCPM-V 4.0 / 4.5 / 4.6 models (BF16 and GPTQ int4) on CPU or GPU.",
        epilog="Run `minicpmv COMMAND --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_chat_parser(sub)
    for module, adder in (("minicpmv.server.cli", "add_serve_parser"), ("minicpmv.quant.quantize_cli",
                                                                       "add_quantize_parser")):
        try:
            mod = __import__(module, fromlist=[adder])
        except ImportError:  # that part of the package is not installed/built yet
            continue
        getattr(mod, adder)(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import InputError, ModelNotFoundError

    try:
        return args.func(args)
    except (InputError, ModelNotFoundError) as e:
        print(f"minicpmv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
