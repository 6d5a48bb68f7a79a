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


class ThreadPool:
    """A pool of threads of this process's own, made on first use.

    A forked child (multiprocessing's default on Linux, a DataLoader worker) gets a pool of its own:
    the parent's threads are not in it, so the parent's pool would take its work and never do it.
    """

    def __init__(self, workers: int, name: str):
        self._workers, self._name = workers, name
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)  # the child runs alone at that moment

    def _reset(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by a thread the child lacks
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` in one of the pool's threads; its future.

        Once the main thread has returned, Python's thread pools take no new work, though other threads
        may go on calling: then ``fn`` runs in the calling thread, and its future is done on return."""
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._name)
            try:
                return self._pool.submit(fn, *args)
            except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
                pass
        from concurrent.futures import Future

        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done


class SerialThread:
    """One daemon thread of this process's own that runs the calls given to it, in order.

    Made on first use (:meth:`start`), and again in a forked child. Unlike a ``ThreadPoolExecutor``,
    it still takes work while the interpreter exits: the pool refuses new work once the main thread
    has ended, which is when the exit handlers wait for uploads that need it. Should the thread not
    start (a thread limit, or an interpreter already shutting down), calls run in the caller's thread.
    """

    def __init__(self, name: str):
        self._name = name
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: Any = None

    def start(self) -> bool:
        """Start the thread now, if not started yet (before the exit, where that may fail); whether it runs."""
        import queue

        with self._lock:
            if self._queue is None:
                work: Any = queue.SimpleQueue()
                try:
                    threading.Thread(target=self._run, args=(work,), name=self._name, daemon=True).start()
                except RuntimeError:
                    return False
                self._queue = work
            return True

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the thread, after what was given before (here, if it cannot start)."""
        if not self.start():
            fn(*args)
            return
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
