"""The command-line contract every entry point shares (the stage scripts, generate_flax.py,
custom_splash_attention.py, `python -m tpu_wan.report`): flags refused in one line, and how a run ends.

A UserError becomes one line on stderr and its exit status (2: bad input; 3: a compile-only run that does not
fit), Ctrl-C status 130, SIGTERM status 143; anything else is a bug and keeps its traceback. Imports no jax.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from tpu_wan.errors import UsageError, UserError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line, exit 2) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def make_parser(doc: str) -> Parser:
    return Parser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so a write in flight removes its
    temp file and leaves the previous artifact as it was."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Runs a script's main; bad input -> one line on stderr and status 2, Ctrl-C -> status 130, SIGTERM -> 143."""
    import signal

    prog = os.path.basename(sys.argv[0])
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(argv)
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    return 0
