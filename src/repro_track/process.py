"""Starting and ending processes of ours (the uploader, the replay child, the CLI), and threads that
survive a fork.

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
import threading
from typing import TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor


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


class ProcessPool:
    """A pool of threads of this process's own, made on first use.

    A forked child (multiprocessing's default on Linux, a DataLoader worker) gets a pool of its own:
    the parent's threads are not in it, so the parent's pool would take its work and never do it.
    """

    def __init__(self, workers: int, name: str):
        self._workers, self._name = workers, name
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` in one of the pool's threads; its future."""
        if self._pid != os.getpid():  # first use, or the first in a forked child (whose lock may be held)
            self._lock, self._pool, self._pid = threading.Lock(), None, os.getpid()
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._name)
            return self._pool.submit(fn, *args)


class SerialThread:
    """One daemon thread of this process's own that runs the calls given to it, in order.

    Made on first use (:meth:`start`), and again in a forked child. Unlike a ``ThreadPoolExecutor``,
    it still takes work while the interpreter exits: the pool refuses new work once the main thread
    has ended, which is when the exit handlers wait for uploads that need it.
    """

    def __init__(self, name: str):
        self._name = name
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._queue: Any = None

    def start(self) -> None:
        """Start the thread now, if not started in this process (before the exit, where that may fail)."""
        import queue

        if self._pid != os.getpid():  # first use, or the first in a forked child (whose lock may be held)
            self._lock, self._queue, self._pid = threading.Lock(), None, os.getpid()
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._queue,), name=self._name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the thread, after what was given before."""
        self.start()
        self._queue.put((fn, args))

    @staticmethod
    def _run(work: Any) -> None:
        while True:
            fn, args = work.get()
            try:
                fn(*args)
            except BaseException:  # the callers handle their own failures; this thread must go on
                import logging

                logging.getLogger(__name__).debug("background call failed", exc_info=True)
