"""``psctl``'s entry point: load the command line (``cli``) and run it.

Loading takes about a second (numpy, gRPC, rich). Ctrl-C meanwhile ends psctl at once with status
130 and nothing on stderr, as it does once a command runs (``cli._handled``), instead of a Python
traceback from whichever import it stopped: a ``KeyboardInterrupt``, or the ``RuntimeError`` a
class being built wraps it in.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

__all__ = ["main"]


def main() -> None:
    quiet = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (not when SIGINT is ignored)
    if quiet:
        signal.signal(signal.SIGINT, _interrupted)
    from .cli import app

    if quiet:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    app()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    os._exit(130)  # (nothing is written or held yet: no exception can be half-handled by an import)


if __name__ == "__main__":
    main()
