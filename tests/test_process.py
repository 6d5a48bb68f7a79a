"""Tests for repro_track.process: threads of our own that survive a fork and the interpreter's exit."""

from __future__ import annotations

import threading

import pytest

from repro_track.process import SerialThread


class TestSerialThread:
    def test_runs_in_order_in_its_own_thread(self) -> None:
        worker, seen, done = SerialThread("test-serial"), [], threading.Event()
        for index in range(5):
            worker.submit(lambda i: seen.append((i, threading.current_thread().name)), index)
        worker.submit(done.set)
        assert done.wait(10)
        assert [i for i, _ in seen] == list(range(5)) and {name for _, name in seen} == {"test-serial"}

    def test_a_thread_that_cannot_start_runs_the_call_here(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """As when the interpreter is already shutting down: nothing is queued for a thread that is not there."""

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't create new thread at interpreter shutdown")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        worker, seen = SerialThread("test-refused"), []
        assert worker.start() is False
        worker.submit(lambda: seen.append(threading.current_thread() is threading.main_thread()))
        assert seen == [True]
