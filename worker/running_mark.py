"""The RUNNING mark, written only for jobs that are still running after a delay.

Why: a job of tens of milliseconds spends more on the backend request that marks it
RUNNING than on anything a person could see of that state (the bench's W1: three
backend requests per job, on a CPU-bound box). So the mark is armed when a job starts
and written by one thread when it falls due; the job disarms it when it ends. Disarm
waits for a write already under way, so a RUNNING write never lands after the final
one. ``after_s == 0`` writes every mark at once, in the caller's thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("worker.running_mark")

Write = Callable[[], Any]


class Mark:
    """One job's pending RUNNING write; ``disarm()`` when the job ends."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._settled = False  # written or disarmed: never written (again)
        self.written = False

    def write_now(self) -> None:
        """Write the mark now unless it is written or disarmed (a deferred job, say)."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
            try:
                self._write()
                self.written = True
            except Exception as e:  # a mark is best effort; the job goes on
                log.warning("RUNNING mark not written", error=f"{type(e).__name__}: {e}")

    def disarm(self) -> None:
        """No write from now on; waits for one under way to finish."""
        with self._lock:
            self._settled = True


class RunningMarks:
    """Writes each armed mark ``after_s`` seconds after it was armed, unless disarmed."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._due: list[tuple[float, int, Mark]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, write: Write) -> Mark:
        mark = Mark(write)
        if self.after_s <= 0:
            mark.write_now()
            return mark
        with self._cond:
            heapq.heappush(self._due, (time.monotonic() + self.after_s, next(self._seq), mark))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="synapse-running-marks", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return mark

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(timeout)
                _, _, mark = heapq.heappop(self._due)
            mark.write_now()  # outside the condition: arm() never waits for a write

    @property
    def armed(self) -> int:
        with self._cond:
            return sum(1 for _, _, m in self._due if not m._settled)
