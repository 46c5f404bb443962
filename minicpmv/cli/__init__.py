"""The `minicpmv` command: chat, run (batch), serve, quantize, download.

Importing this package does not import torch: `minicpmv --help` and `--version` answer at
once, and every check of the user's input runs before the model (or torch) is loaded. A user
mistake is one line on stderr, `error: PROBLEM (FIX)`, and exit code 2; `--debug` shows the
traceback instead."""
from __future__ import annotations

import argparse
import sys

from .errors import CliError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (not usage + error)."""

    def error(self, message):
        raise CliError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def _debug_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback when something fails")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..server.cli import add_serve_parser
    from .batch import add_run_parser
    from .chat import add_chat_parser
    from .download import add_download_parser
    from .quantize import add_quantize_parser

    parser = Parser(prog="minicpmv",
                    description="minicpmv: run MiniCPM-V 4.0 / 4.5 / 4.6 models (BF16 and GPTQ int4) on CPU or GPU.",
                    epilog="Run `minicpmv COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"minicpmv {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    parents = [_debug_parent()]
    for add in (add_chat_parser, add_run_parser, add_serve_parser, add_quantize_parser, add_download_parser):
        add(sub, parents)
    return parser


def _parse(argv):
    parser = build_parser()
    try:
        return parser.parse_args(argv)
    except CliError as e:  # point at the subcommand's help when one was named
        words = sys.argv[1:] if argv is None else list(argv)
        command = next((w for w in words if not w.startswith("-")), None)
        if command in ("chat", "run", "serve", "quantize", "download"):
            e.fix = f"see `minicpmv {command} --help`"
        raise


def main(argv=None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
        return args.func(args)
    except CliError as e:
        if debug:
            raise
        print(e.line(), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minicpmv chat ... | head`: the reader has gone, which is fine
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except Exception as e:  # noqa: BLE001  (one line unless --debug)
        if debug:
            raise
        from ..errors import InputError, ModelNotFoundError

        if isinstance(e, (InputError, ModelNotFoundError)):
            print(CliError(str(e)).line(), file=sys.stderr)
            return 2
        print(CliError(f"{type(e).__name__}: {e}", "run again with --debug for the traceback, and report it if it "
                                                     "is not a problem with the input").line(), file=sys.stderr)
        return 1
