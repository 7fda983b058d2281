"""A job's life: a short list of steps around one ``execute(job)``.

Every task (``run`` and ``poll``) goes through ``process``: each step's ``before`` may
end the job early with an outcome (skipped, requeued, failed), else ``execute`` runs
the inference; then every step whose ``before`` ran gets its ``after``, in reverse
order, whatever happened. What the outcome means for the backend and the broker is
decided in one place, ``worker.settle``. The shape is dramatiq's middleware: one
concern per step, no step knows the others.

Outcomes are values, not exceptions: a path that forgets one is a type error, not a
job left RUNNING.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from config import redact_text
from config.errors import DeadlineExceeded, is_transient
from worker.message import JobMessage

log = structlog.get_logger("worker.pipeline")


@dataclass(frozen=True)
class PollState:
    """Where a deferred job stands: its ticket and how its polls went."""

    ticket: str
    first_pending_at: float
    polls: int = 0
    errors: int = 0


@dataclass
class Job:
    """One execution of one message."""

    msg: JobMessage
    task_id: str | None
    attempt: int  # 1 for the first; each retry adds one
    started: float  # wall clock, when the job's first attempt started
    deadline: float  # time.monotonic() instant: this execution's time limit
    time_limit_s: float
    poll: PollState | None = None

    @property
    def job_id(self) -> str:
        return self.msg.job_id


# --- outcomes


@dataclass(frozen=True)
class Finished:
    """A final status to write: SUCCEEDED or FAILED, with the result or the error."""

    status: Literal["SUCCEEDED", "FAILED"]
    result: Any = None
    error: str | None = None
    inference_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, int] | None = None


@dataclass(frozen=True)
class TryAgain:
    """A transient failure: retried with backoff within the bound, then FAILED."""

    error: str
    status = "RETRY"


@dataclass(frozen=True)
class Deferred:
    """The replica answered a ticket: poll it later, from a task of its own."""

    poll: PollState
    countdown: float | None = None  # None: the regular poll interval
    status = "DEFERRED"


@dataclass(frozen=True)
class Skipped:
    """Nothing to do: the job is final, or its result is already waiting in the outbox."""

    reason: str
    status = "SKIPPED"


@dataclass(frozen=True)
class Requeued:
    """The job goes back to the queue as a new message (its model must wait, say).

    ``resubmit``: its deferred ticket was lost and it is computed again (counted in
    ``JobMessage.resubmits``, bounded by ``SYNAPSE_BRIDGE_DEFERRED_RESUBMITS``).
    """

    reason: str
    resubmit: bool = False
    status = "REQUEUED"


@dataclass(frozen=True)
class Rejected:
    """The message itself is wrong (the backend does not know the job, or not for this
    tenant): to the invalid queue at once, never retried."""

    reason: str
    status = "INVALID"


Outcome = Finished | TryAgain | Deferred | Skipped | Requeued | Rejected


def succeeded(result: Any, **kw: Any) -> Finished:
    return Finished("SUCCEEDED", result=result, **kw)


def failed(error: str, **kw: Any) -> Finished:
    return Finished("FAILED", error=error, **kw)


def error_text(e: BaseException) -> str:
    """An error as it may be logged and written: type, message, secrets redacted."""
    return redact_text(f"{type(e).__name__}: {e}")[:2000]


def time_limit_failure(job: Job, done: str = "") -> Finished:
    return failed(f"time limit of {job.time_limit_s:g}s exceeded{done}")


# --- steps


class Step:
    """One concern of a job's life. ``before`` may return an outcome to end the job
    there; ``after`` runs for every step whose ``before`` ran, and must not raise."""

    def before(self, job: Job) -> Outcome | None:
        return None

    def after(self, job: Job, outcome: Outcome) -> None:
        return None


Execute = Callable[[Job], Outcome]


def process(job: Job, steps: Sequence[Step], execute: Execute) -> Outcome:
    """Run ``job`` through ``steps`` and ``execute``; every exception becomes an outcome.

    A time limit fails the job; a transient error, or one nobody expected (a bug, a
    library error), is tried again within the retry bound, never swallowed.
    """
    entered: list[Step] = []
    outcome: Outcome | None = None
    try:
        for step in steps:
            outcome = step.before(job)
            entered.append(step)
            if outcome is not None:
                break
        else:
            outcome = execute(job)
    except DeadlineExceeded:
        outcome = time_limit_failure(job)
    except Exception as e:
        text = error_text(e)
        if not is_transient(e):
            log.error("unexpected error in a job; trying again within the bound", error=text)
        outcome = TryAgain(text)
    finally:
        settled = outcome if outcome is not None else TryAgain("interrupted")
        for step in reversed(entered):
            try:
                step.after(job, settled)
            except Exception as e:  # a step's clean-up never changes the outcome
                log.warning("step clean-up failed", step=type(step).__name__, error=error_text(e))
    return outcome


def monotonic_deadline(time_limit_s: float) -> float:
    return time.monotonic() + time_limit_s
