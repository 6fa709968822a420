"""The ``invdiff`` command line: ``demo``, ``list``, ``convert``, ``train``, ``bench``, ``simulate``, ``reconstruct``.

One module per command (:mod:`.demo`, :mod:`.listing`, :mod:`.train`, :mod:`.bench`,
:mod:`.workflows`), each with ``register(subparsers)``; the options every command shares
(``--device``, ``--seed``, ``-v/-q``, ``KEY=VALUE``) are in :mod:`.options`. Every command
exits non-zero with a one-line ``invdiff: error: ...`` message on bad input. Top-level
imports stay light (torch-heavy code is imported inside the command functions) so
``invdiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: The command modules, in the order ``invdiff --help`` lists them. To add a command, write a
#: module with ``register(subparsers)`` that adds its parser with ``set_defaults(func=...)``.
COMMAND_MODULES: tuple[str, ...] = ("demo", "listing", "convert", "train", "bench", "workflows")


class UsageError(Exception):
    """A command-line usage error (unknown option, bad value): one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with invdiff's error convention: a usage error is one line
    (``invdiff: error: ... (see invdiff reconstruct --help)``) and exit status 1, like every
    other error, instead of argparse's usage block and status 2."""

    def error(self, message: str):
        raise UsageError(f"invdiff: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="invdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module}").register(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (a library's multi-line text folded)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error is one line on stderr and a non-zero status (1; 130
    after Ctrl-C, at any point, start-up included)."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that log provenance
        return args.func(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError, OSError, ImportError) as err:
        # ImportError: an optional extra is missing; its message names the pip command
        print(f"invdiff: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("invdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
