"""Starting and ending processes of ours (the uploader, the replay child, the CLI).

A module of ours runs as a script with the working directory left off ``sys.path``: ``python -m``
puts it first, where a ``json.py`` or ``filelock.py`` of the caller's would run in our process (with
the caller's credentials, in the uploader; before the plan is checked, in a replay child).

Ending one without the interpreter's teardown: tearing down torch and the other libraries a command loaded takes over a second, which a user (or a
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


def module_command(module: str) -> list[str]:
    """The interpreter arguments that run ``module`` as ``__main__``, the working directory off sys.path."""
    return ["-c", "import sys; sys.path[:] = [p for p in sys.path if p != '']; import runpy; "
                  f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"]
