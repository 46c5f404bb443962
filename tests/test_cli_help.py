"""The help texts against the real options: every option of every subcommand is in its --help,
every flag the help texts and the README's command lines mention exists, and --help/--version
answer in under a second without importing torch."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import pytest

from cli_support import REPO
from minicpmv.cli import build_parser

COMMANDS = ["chat", "run", "serve", "quantize", "download"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_every_subcommand_is_listed():
    assert sorted(subparsers()) == sorted(COMMANDS)
    top = build_parser().format_help()
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", top, re.M), name


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_option(name):
    out = subprocess.run([sys.executable, "-m", "minicpmv", name, "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = set(FLAG.findall(out.stdout))
    parser = subparsers()[name]
    assert {o for o in options(parser) if o.startswith("--")} <= shown
    for action in parser._actions:  # and every option says what it does
        if action.option_strings:
            assert action.help, f"{name} {action.option_strings} has no help text"


def mentioned_flags(text: str, default: str):
    """(command, flag) for each flag in a help text; a line that runs `minicpmv CMD` checks
    against CMD's options."""
    for line in text.splitlines():
        m = re.search(r"minicpmv (\w+)", line)
        command = m.group(1) if m and m.group(1) in COMMANDS else default
        for flag in FLAG.findall(line):
            yield command, flag


@pytest.mark.parametrize("name", COMMANDS)
def test_flags_named_in_help_texts_exist(name):
    parsers = subparsers()
    parser = parsers[name]
    texts = [parser.description or "", parser.epilog or "", *(a.help or "" for a in parser._actions)]
    for command, flag in mentioned_flags("\n".join(texts), name):
        assert flag in options(parsers[command]) | {"--help"}, f"`minicpmv {name} --help` mentions {flag}, " \
                                                               f"which `minicpmv {command}` does not take"


def test_flags_in_the_readme_commands_exist():
    parsers = subparsers()
    readme = (REPO / "README.md").read_text()
    lines = [line for line in re.findall(r"`([^`\n]*minicpmv [^`\n]*)`", readme)]
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    checked = 0
    for line in lines:
        m = re.search(r"minicpmv (\w+)", line)
        if not m or m.group(1) not in COMMANDS:
            continue
        for flag in FLAG.findall(line[m.start():]):
            checked += 1
            assert flag in options(parsers[m.group(1)]) | {"--help"}, f"README: {line.strip()!r} uses {flag}"
    assert checked > 10


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["chat", "--help"], ["serve", "--help"]])
def test_answers_in_under_a_second_without_torch(argv):
    code = "import runpy, sys; sys.argv = ['minicpmv', *sys.argv[1:]]\ntry:\n    runpy.run_module('minicpmv', " \
           "run_name='__main__')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n" \
           "assert 'torch' not in sys.modules, 'torch was imported'"
    best = float("inf")
    for _ in range(3):  # best of three: a busy neighbour on a 2-core machine adds noise, not code
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                             timeout=60)
        best = min(best, time.perf_counter() - start)
        assert out.returncode == 0, out.stderr
    assert best < 1.0, f"minicpmv {' '.join(argv)} took {best:.2f} s"
    if argv == ["--version"]:
        assert re.fullmatch(r"minicpmv \d+\.\d+\.\d+\n", out.stdout)
