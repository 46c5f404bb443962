"""A streamed answer on the terminal: the thinking dimmed on stderr, the answer on stdout, and
escaped newlines (a literal backslash-n outside code and math) shown as line breaks unless
--raw (minicpmv/newlines.py). What the model wrote is kept as it is everywhere else."""
from __future__ import annotations

from ..newlines import NewlineUnescaper


class Display:
    def __init__(self, out, err, dim: bool, raw: bool = False):
        self.out, self.err, self.dim = out, err, dim
        self.unescapers = None if raw else {"reasoning": NewlineUnescaper(), "content": NewlineUnescaper()}
        self.thought = False

    def write(self, kind: str, text: str) -> None:
        if self.unescapers is not None:
            text = self.unescapers[kind].feed(text)
        if not text:
            return
        if kind == "reasoning":
            self.err.write(f"\033[2m{text}\033[0m" if self.dim else text)
            self.err.flush()
            self.thought = True
        else:
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        """The answer ended (or was stopped): show what was held back, end the lines."""
        if self.unescapers is not None:
            tails = [(kind, stream.flush()) for kind, stream in self.unescapers.items()]
            self.unescapers = None
            for kind, rest in tails:
                self.write(kind, rest)
        self.out.write("\n")
        self.out.flush()
        if self.thought:
            self.err.write("\n")
