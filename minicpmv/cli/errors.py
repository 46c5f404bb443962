"""A user mistake the command line reports as one line, `error: PROBLEM (FIX)`, and exit code 2."""
from __future__ import annotations


class CliError(Exception):
    def __init__(self, problem: str, fix: str | None = None, code: int = 2):
        super().__init__(problem)
        self.problem, self.fix, self.code = problem, fix, code

    def line(self) -> str:
        text = f"error: {self.problem}" + (f" ({self.fix})" if self.fix else "")
        return " ".join(text.split())  # one line, whatever the messages held
