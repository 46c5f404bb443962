"""The interactive `minicpmv chat` session driven through a pseudo-terminal, as a person types:
streaming, Ctrl-C stopping the answer (not the program), history, /image, /video, /think, /reset."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cli_support import REPO
from test_server_support import video_bytes

STOPPED = re.compile(r"\[stopped\] \((\d+) prompt tokens\)")


class Terminal:
    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so ^C is a SIGINT
            os.chdir(REPO)
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
            os.environ["PYTHONFAULTHANDLER"] = "1"  # a hang dumps every thread's stack on SIGABRT
            os.execv(sys.executable, [sys.executable, "-m", "minicpmv", *argv])
        self.buffer = ""
        self.transcript = ""  # all the output, for a failure's message
        self.at_interrupt = ""  # the program's signal state when Ctrl-C was last sent

    def expect(self, pattern, timeout=120) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.buffer)
            if m:
                self.buffer = self.buffer[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in {self.buffer[-2000:]!r}; {self.diagnosis()}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"the program ended; no {pattern!r} in {self.buffer[-2000:]!r}; "
                                     f"error lines: {[x for x in self.transcript.splitlines() if 'Error' in x][:20]!r}")
                text = data.decode(errors="replace").replace("\r\n", "\n")
                self.buffer += text
                self.transcript += text

    def signal_state(self) -> str:
        """The program's SIGINT disposition as the kernel sees it (ignored, blocked, caught, pending)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return " ".join(line.strip() for line in f if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))
        except OSError as e:
            return f"unreadable ({e})"

    def diagnosis(self) -> str:
        notes = [line for line in self.transcript.splitlines() if "Traceback" in line or "Exception ignored" in line
                 or "Error" in line or "Interrupt" in line]
        return (f"signal state at the last Ctrl-C: {self.at_interrupt}; now: {self.signal_state()}; "
                f"error lines in the output: {notes[:20]!r}; stacks:\n{self.stacks()}")

    def stacks(self) -> str:
        """What the program is doing: faulthandler's dump of every thread (SIGABRT)."""
        os.kill(self.pid, signal.SIGABRT)
        out, deadline = b"", time.monotonic() + 10
        while time.monotonic() < deadline and select.select([self.fd], [], [], 1)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        return out.decode(errors="replace")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def type(self, line: str) -> None:
        """Wait for the `> ` prompt, then type a line (typed ahead, a line would be echoed by the
        terminal before the program reads it, and a Ctrl-C then would flush it unread)."""
        self.expect(r"> ")
        self.send(line + "\n")

    def ask_and_interrupt(self, text: str) -> int:
        """Type a message, wait for the answer to stream, press Ctrl-C; returns the prompt size."""
        self.type(text)
        self.expect(re.escape(text) + r"\n[^>\n]")  # the echo, then streamed answer text
        self.send("\x03")
        self.at_interrupt = self.signal_state()
        return int(self.expect(STOPPED).group(1))

    def wait(self, timeout=60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the session did not end")


@pytest.fixture
def media(tmp_path):
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (40, 60, 3)).astype("uint8")).save(image)
    video = tmp_path / "clip.mp4"
    video.write_bytes(video_bytes(seconds=2, fps=4))
    return image, video


def test_interactive_session(tiny46_dir, media):
    image, video = media
    term = Terminal(["chat", "--model", str(tiny46_dir), "--quiet", "--greedy", "--threads", "1",
                     "--max-new-tokens", "3000"])
    try:
        term.expect(r"/help lists the commands")
        first = term.ask_and_interrupt("Hello there")  # Ctrl-C stopped the answer, the program still asks
        second = term.ask_and_interrupt("And again")
        assert second > first + 5  # the first turn (and its partial answer) is in the history

        term.type("/image " + str(image))
        term.expect(r"image attached to your next message")
        term.type("/image " + str(image.with_name("dog.png")))
        term.expect(r"error: --image .*dog.png: no such file")  # a typo is reported; the session goes on
        with_image = term.ask_and_interrupt("What is this?")
        assert with_image > second + 20  # vision placeholders joined the prompt

        term.type("/reset")
        term.expect(r"conversation cleared")
        assert term.ask_and_interrupt("Hello there") == first  # nothing remembered

        term.type("/reset")
        term.type("/think on")
        term.expect(r"\(thinking on\)")
        thinking = term.ask_and_interrupt("Hello there")
        assert thinking != first  # the template renders the thinking switch
        term.type("/reset")
        term.type("/think off")
        term.expect(r"\(thinking off\)")
        assert term.ask_and_interrupt("Hello there") == first

        term.type("/video " + str(video))
        term.expect(r"video attached")
        assert term.ask_and_interrupt("What happens?") > first + 20

        term.expect(r"> ")
        # Ctrl-C at the prompt does not quit either. (A SIGINT in the microseconds between the prompt
        # being drawn and readline's wait for input is only seen at the next key: a human cannot hit
        # that window, a test that types the moment the prompt appears can.)
        time.sleep(0.5)
        term.send("\x03")
        term.expect(r"Ctrl-D or /exit quits")
        term.type("/think maybe")
        term.expect(r"usage: /think on\|off")
        term.expect(r"> ")
        term.send("\x04")  # Ctrl-D: end of input
        assert term.wait() == 0
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(term.fd)
