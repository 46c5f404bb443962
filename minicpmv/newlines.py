"""Escaped newlines for display. MiniCPM-V sometimes writes a literal backslash-n (two
characters) where it means a line break. Where text is shown to a person (the web chat, the
CLI) those become real newlines, except where a backslash-n means something else:

* inside fenced code (a run of 3+ backticks or tildes at the start of a line, to the next run
  of the same marker; an unclosed fence runs to the end) and inline code (a backtick run to the
  next run of the same length);
* inside math: `$$...$$`, `\\[...\\]`, `\\(...\\)`, and `$...$` where the opening `$` is followed
  by a non-space, the closing `$` follows a non-space, is not escaped and is not followed by a
  digit, and no real newline lies between (so "$5 and $6" is not math);
* after an escaped backslash: `\\\\n` is a backslash followed by the letter n.

An unclosed `$`, `\\(`, `\\[` or backtick run is ordinary text. `NewlineUnescaper` does the same
on a stream: it holds back only what the next characters could still change, so feeding text
in any pieces gives exactly `unescape_newlines` of the whole. The web page carries a JavaScript
twin (server/static/newlines.js) tested on the same cases (tests/data/newline_cases.json).
"""
from __future__ import annotations

import re

_PLAIN = re.compile(r"[^\n`~$\\]+")
_SPACE = " \t\n\r\f\v"
_MATH_CLOSERS = {"(": "\\)", "[": "\\]"}


def unescape_newlines(text: str) -> str:
    """`text` with each escaped newline outside code and math turned into a newline."""
    stream = NewlineUnescaper()
    return stream.feed(text) + stream.flush()


class NewlineUnescaper:
    """feed(piece) -> the text that is now certain; flush() -> the rest, at the end of the stream."""

    def __init__(self):
        self._pending = ""  # input not yet decided
        self._line_start = True  # output is at the start of a line (only spaces since the newline)
        self._fence: str | None = None  # the marker of the open code fence

    def feed(self, text: str) -> str:
        self._pending += text
        return self._scan(final=False)

    def flush(self) -> str:
        return self._scan(final=True)

    def _scan(self, final: bool) -> str:
        s, i, out = self._pending, 0, []
        while i < len(s):
            if self._fence is not None:
                i = self._in_fence(s, i, out, final)
                if self._fence is not None:
                    break
                continue
            step = self._token(s, i, final)
            if step is None:  # undecided until more text arrives
                break
            emitted, i = step
            out.append(emitted)
        self._pending = s[i:]
        return "".join(out)

    def _in_fence(self, s: str, i: int, out: list, final: bool) -> int:
        j = s.find(self._fence, i)
        if j < 0:  # still inside: pass it through, keeping a tail that may start the closing marker
            end = len(s) if final else max(i, len(s) - len(self._fence) + 1)
            out.append(s[i:end])
            return end
        end = j + len(self._fence)
        out.append(s[i:end])
        self._fence, self._line_start = None, False
        return end

    def _token(self, s: str, i: int, final: bool) -> tuple[str, int] | None:
        c = s[i]
        if c == "\n":
            self._line_start = True
            return c, i + 1
        if c == "\\":
            return self._backslash(s, i, final)
        if c in "`~":
            return self._ticks(s, i, final)
        if c == "$":
            return self._dollar(s, i, final)
        m = _PLAIN.match(s, i)
        self._line_start = self._line_start and not m.group().strip(" ")
        return m.group(), m.end()

    def _backslash(self, s: str, i: int, final: bool):
        if i + 1 == len(s):
            return self._plain("\\", i + 1) if final else None
        d = s[i + 1]
        if d == "n":
            self._line_start = True
            return "\n", i + 2
        if d in _MATH_CLOSERS:
            j = s.find(_MATH_CLOSERS[d], i + 2)
            if j >= 0:
                return self._plain(s[i:j + 2], j + 2)
            return self._plain(s[i:i + 2], i + 2) if final else None
        return self._plain(s[i:i + 2], i + 2)  # an escaped character: `\\`, `\$`, `\``

    def _ticks(self, s: str, i: int, final: bool):
        c = s[i]
        k = _run(s, i, c)
        if i + k == len(s) and not final and (c == "`" or self._line_start):
            return None  # the run may grow
        if self._line_start and k >= 3:
            self._fence = c * k
            return self._plain(s[i:i + k], i + k)
        if c == "~":
            return self._plain(s[i:i + k], i + k)
        j = i + k
        while (j := s.find("`", j)) >= 0:  # the next backtick run of exactly k closes the code span
            m = _run(s, j, "`")
            if j + m == len(s) and not final:
                return None
            if m == k:
                return self._plain(s[i:j + k], j + k)
            j += m
        return self._plain(s[i:i + k], i + k) if final else None

    def _dollar(self, s: str, i: int, final: bool):
        if i + 1 == len(s):
            return self._plain("$", i + 1) if final else None
        if s[i + 1] == "$":
            j = s.find("$$", i + 2)
            if j >= 0:
                return self._plain(s[i:j + 2], j + 2)
            return self._plain("$$", i + 2) if final else None
        if s[i + 1] in _SPACE:
            return self._plain("$", i + 1)
        j = i + 1
        while j < len(s):
            ch = s[j]
            if ch == "\n":
                break
            if ch == "\\":
                j += 2
                continue
            if ch == "$" and s[j - 1] not in _SPACE:
                if j + 1 == len(s) and not final:
                    return None  # a digit may follow
                if j + 1 == len(s) or not s[j + 1].isascii() or not s[j + 1].isdigit():
                    return self._plain(s[i:j + 1], j + 1)
            j += 1
        else:
            if not final:
                return None
        return self._plain("$", i + 1)

    def _plain(self, text: str, end: int) -> tuple[str, int]:
        self._line_start = False
        return text, end


def _run(s: str, i: int, c: str) -> int:
    j = i
    while j < len(s) and s[j] == c:
        j += 1
    return j - i
