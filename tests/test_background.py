"""pipeline/background.py: jobs on a helper thread in order, errors re-raised in the caller,
queued work dropped after an error, memory bounded by max_pending."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.background import BackgroundWriter, ReadAhead


def test_jobs_run_in_order_on_one_helper_thread() -> None:
    seen: list[tuple[int, str]] = []
    with BackgroundWriter() as writer:
        for i in range(20):
            writer.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert [i for i, _ in seen] == list(range(20))
    assert len({name for _, name in seen}) == 1
    assert seen[0][1] != threading.current_thread().name


def test_a_failed_job_is_raised_by_the_caller_and_later_jobs_are_dropped() -> None:
    ran: list[int] = []
    gate = threading.Event()

    def fail() -> None:
        gate.wait(5)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        with BackgroundWriter() as writer:
            writer.submit(fail)
            for i in range(5):
                writer.submit(ran.append, i)
            gate.set()
    assert ran == []  # queued behind the failure: never run


def test_an_error_in_the_caller_drops_queued_jobs() -> None:
    ran: list[int] = []
    gate = threading.Event()
    opener = threading.Timer(0.2, gate.set)  # opens the running job after the error
    opener.start()
    with pytest.raises(ValueError, match="model failed"):
        with BackgroundWriter() as writer:
            writer.submit(gate.wait, 5)
            for i in range(5):
                writer.submit(ran.append, i)
            raise ValueError("model failed")
    opener.join()
    assert ran == []  # cancelled while the running job still waited


def test_max_pending_bounds_the_jobs_in_flight() -> None:
    in_flight = []
    lock = threading.Lock()
    queued = 0

    def job() -> None:
        nonlocal queued
        time.sleep(0.01)
        with lock:
            queued -= 1

    with BackgroundWriter(max_pending=1) as writer:
        for _ in range(10):
            with lock:
                queued += 1
            writer.submit(job)
            with lock:
                in_flight.append(queued)
    assert max(in_flight) <= 1
    assert queued == 0


def test_max_pending_raises_a_failure_at_the_next_submit() -> None:
    with BackgroundWriter(max_pending=1) as writer:
        writer.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            writer.submit(lambda: None)  # waits for the failed job: its error comes here


def test_read_ahead_reads_in_order_one_item_ahead() -> None:
    started: list[int] = []
    consumed: list[int] = []

    def read(i: int) -> int:
        started.append(i)
        return i * 10

    with ReadAhead(read, 4) as items:
        assert len(items) == 4
        for item in items:
            time.sleep(0.02)  # the next read has started meanwhile
            consumed.append(item)
            assert len(started) <= len(consumed) + 1
    assert consumed == [0, 10, 20, 30] and started == [0, 1, 2, 3]


def test_read_ahead_raises_a_failed_read_and_reads_nothing_of_nothing() -> None:
    def read(i: int) -> int:
        if i == 2:
            raise OSError(f"item {i} unreadable")
        return i

    with pytest.raises(OSError, match="item 2"):
        with ReadAhead(read, 5) as items:
            list(items)
    with ReadAhead(read, 0) as items:
        assert list(items) == []
