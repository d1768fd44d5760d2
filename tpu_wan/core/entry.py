"""The command-line contract every entry point shares (the stage scripts, generate_flax.py,
custom_splash_attention.py, `python -m tpu_wan.core.report`): flags refused in one line, and how a run ends.

A UserError becomes one line on stderr and its exit status (2: bad input; 3: a compile-only run that does not
fit), a program the TPU compiler refuses as larger than the chip's HBM one line and status 3 too, a missing
dependency one line and status 2, Ctrl-C status 130, SIGTERM status 143 (and in a multi-process run, the loss of
another process one line and status 4: tpu_wan.runtime.distributed); anything else is a bug and keeps its traceback.
Imports no jax.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from tpu_wan.core.errors import DoesNotFit, UsageError, UserError
from tpu_wan.tpu import hlo


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line, exit 2) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def make_parser(doc: str) -> Parser:
    return Parser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)


# import name -> the distribution that provides it: the dependencies pyproject.toml declares (and libtpu, which
# `--topology` needs), so that running from a tree whose environment lacks one says which, in one line.
DEPENDENCIES = {
    "torch": "torch", "jax": "jax", "jaxlib": "jaxlib", "torchax": "torchax", "diffusers": "diffusers",
    "transformers": "transformers", "flax": "flax", "safetensors": "safetensors", "imageio": "imageio",
    "imageio_ffmpeg": "imageio-ffmpeg", "huggingface_hub": "huggingface_hub", "tokenizers": "tokenizers",
    "sentencepiece": "sentencepiece", "ftfy": "ftfy", "ml_dtypes": "ml_dtypes", "numpy": "numpy", "tqdm": "tqdm",
    "accelerate": "accelerate", "filelock": "filelock", "cv2": "opencv-python-headless", "libtpu": "libtpu",
}


def missing_dependency(err: ModuleNotFoundError) -> str | None:
    """The one-line message for a dependency that is not installed; None for any other missing module (a bug)."""
    top = (err.name or "").split(".")[0]
    if top not in DEPENDENCIES:
        return None
    return (f"expected the Python package {DEPENDENCIES[top]} installed (pip install -e . installs every "
            f"dependency at its tested version), found no module {err.name!r}")


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
    except ModuleNotFoundError as err:
        if (message := missing_dependency(err)) is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001  one kind is an answer, not a bug; every other one raises again
        if (oom := hlo.out_of_memory(err)) is None:
            raise
        print(f"{prog}: error: a program needs more memory than one chip has: expected at most "
              f"{oom.available_bytes / 2**30:.2f} GiB (the TPU compiler's limit), found it needs "
              f"{oom.required_bytes / 2**30:.2f} GiB (try more chips or tp, a smaller size, or --sharding sequence; "
              f"plan with --topology NAME --compile_only)", file=sys.stderr)
        return DoesNotFit.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    return 0
