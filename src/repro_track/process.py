"""Ending a process of ours (the CLI, the replay child) without the interpreter's teardown.

Tearing down torch and the other libraries a command loaded takes over a second, which a user (or a
replay waiting for its child) would wait for while nothing is left to do. The exit handlers run first,
as a normal exit runs them (pending uploads, MLflow's and logging's own), then the output is flushed.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Run the exit handlers, flush stdout and stderr, and end the process with ``code``."""
    atexit._run_exitfuncs()  # what a normal exit runs before the teardown
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
