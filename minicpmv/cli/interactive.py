"""The interactive `minicpmv chat` session: multi-turn history, media attached with /image and
/video, thinking switched with /think, answers streamed; Ctrl-C stops the answer, Ctrl-D quits."""
from __future__ import annotations

import sys

from ..errors import InputError
from .display import Display
from .errors import CliError
from .generate import finish_note, prepare, sampling_params
from .preflight import FAMILY_NAMES, check_media

HELP = """commands:
  /image PATH_OR_URL   attach an image to your next message
  /video PATH_OR_URL   attach a video to your next message
  /think on|off        thinking mode (now: {think})
  /reset               forget the conversation
  /help                this list
  /exit                quit (or Ctrl-D); Ctrl-C stops an answer"""


class Session:
    def __init__(self, model, args, media=(), stdin=None, out=None, err=None):
        self.model, self.args = model, args
        self.stdin, self.out, self.err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
        self.history: list[dict] = []
        self.pending: list[dict] = list(media)  # media for the next user message
        self.think = bool(args.think)
        self.dim = self.err.isatty()

    def run(self) -> int:
        name = FAMILY_NAMES.get(self.model.family.name, self.model.family.name)
        self.say(f"{name} chat: type a message; /help lists the commands. Ctrl-C stops an answer, Ctrl-D quits.")
        while True:
            try:
                line = self.read_line()
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /exit quits)")
                continue
            if line is None:  # end of input
                self.out.write("\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "exit":
                    return 0
                continue
            try:
                self.turn(line)
            except KeyboardInterrupt:  # while the media were read or the prompt prepared
                self.say("\n[stopped]")

    def read_line(self) -> str | None:
        if self.stdin is sys.stdin and sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            try:
                return input("> ")
            except EOFError:
                return None
        line = self.stdin.readline()  # piped input: one message or command per line, no prompt drawn
        return line if line else None

    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return "exit"
        if name in ("/image", "/video"):
            kind = name[1:]
            if not rest:
                self.say(f"usage: /{kind} PATH_OR_URL")
                return None
            try:
                check_media(kind, rest)
            except CliError as e:
                self.say(e.line())
                return None
            self.pending.append({"type": kind, kind: rest})
            self.say(f"({kind} attached to your next message: {rest})")
        elif name == "/reset":
            self.history, self.pending = [], []
            self.say("(conversation cleared)")
        elif name == "/think":
            if rest not in ("on", "off"):
                self.say(f"usage: /think on|off (now: {'on' if self.think else 'off'})")
                return None
            if rest == "on" and self.model.family.name == "minicpmv4_0":
                self.say("MiniCPM-V 4.0 has no thinking mode")
                return None
            self.think = rest == "on"
            self.say(f"(thinking {rest})")
        elif name == "/help":
            self.say(HELP.format(think="on" if self.think else "off"))
        else:
            self.say(f"unknown command {name}; /help lists them")
        return None

    def turn(self, text: str) -> None:
        message = {"role": "user", "content": [*self.pending, text]}
        msgs = self.history + [message]
        try:
            prepared = prepare(self.model, msgs, self.args, self.think, self.err)
        except (InputError, CliError) as e:
            self.say(e.line() if isinstance(e, CliError) else f"error: {e}")
            return
        self.pending = []
        events = self.model.generate_events(prepared, sampling_params(self.model, self.args))
        content = []  # as the model wrote it (the history keeps it so)
        display = Display(self.out, self.err, dim=self.dim, raw=getattr(self.args, "raw", False))
        seq = None
        try:
            while True:
                try:
                    kind, piece = next(events)
                except StopIteration as stop:
                    seq = stop.value[0]  # (Sequence, OutputDecoder)
                    break
                if kind not in ("reasoning", "content"):
                    continue
                if kind == "content":
                    content.append(piece)
                display.write(kind, piece)
        except KeyboardInterrupt:
            events.close()  # aborts the sequence in the engine
            display.close()
            self.say(f"[stopped] ({len(prepared.input_ids)} prompt tokens)")
        else:
            display.close()
            reply = self.model.reply_for(seq, prepared.starts_in_reasoning)
            note = finish_note(reply, self.args.max_new_tokens)
            if note:
                self.say(note)
            self.say(f"({reply.usage['prompt_tokens']} prompt tokens, {reply.usage['completion_tokens']} generated, "
                     f"finish: {reply.finish_reason})")
        self.history += [message, {"role": "assistant", "content": "".join(content)}]

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()
