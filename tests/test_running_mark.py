"""The RUNNING mark: written for jobs still running after the delay, never after disarm."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.running_mark import RunningMarks


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_a_job_disarmed_before_the_delay_is_never_marked() -> None:
    writes: list[str] = []
    marks = RunningMarks(after_s=0.2)
    quick = marks.arm(lambda: writes.append("quick"))
    slow = marks.arm(lambda: writes.append("slow"))
    quick.disarm()
    wait_for(lambda: writes == ["slow"])
    assert slow.written and not quick.written
    slow.disarm()
    assert marks.armed == 0


def test_zero_delay_writes_at_once_in_the_callers_thread() -> None:
    where: list[str] = []
    mark = RunningMarks(after_s=0).arm(lambda: where.append(threading.current_thread().name))
    assert mark.written and where == [threading.current_thread().name]


def test_disarm_waits_for_a_write_under_way() -> None:
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_write() -> None:
        started.set()
        release.wait(5)
        order.append("RUNNING")

    mark = RunningMarks(after_s=0.01).arm(slow_write)
    assert started.wait(5)
    disarmer = threading.Thread(target=lambda: (mark.disarm(), order.append("final")))
    disarmer.start()
    disarmer.join(0.2)
    assert disarmer.is_alive()  # still waiting for the RUNNING write
    release.set()
    disarmer.join(5)
    assert order == ["RUNNING", "final"]


def test_write_now_writes_once_and_a_failed_write_does_not_escape() -> None:
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise ConnectionError("backend down")

    mark = RunningMarks(after_s=30).arm(failing)
    mark.write_now()  # a deferred job: mark it now, not in 30 s
    mark.write_now()
    mark.disarm()
    assert calls == [1] and not mark.written


def test_marks_fall_due_in_order_of_arming() -> None:
    writes: list[int] = []
    marks = RunningMarks(after_s=0.05)
    for i in range(5):
        marks.arm(lambda i=i: writes.append(i))
    wait_for(lambda: len(writes) == 5)
    assert writes == [0, 1, 2, 3, 4]
