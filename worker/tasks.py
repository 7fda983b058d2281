"""The Celery tasks: run a job, poll a deferred one, fail an invalid one.

Each task parses its message, builds a ``Job``, runs it through the pipeline
(``worker.pipeline``: steps around one execute) and settles the outcome
(``worker.settle``). Every path that takes a message ends in a final write, a
scheduled retry or poll, or the message back on the queue: an error while settling
rejects the message with requeue, so the broker delivers it again.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from config.errors import is_transient
from worker.app import app
from worker.batch import BatchRunner
from worker.inference import execute_poll, execute_single
from worker.message import (
    FAIL_INVALID_TASK_NAME,
    POLL_TASK_NAME,
    TASK_NAME,
    InvalidJob,
    parse_job,
    readable_job_id,
    safe_kwargsrepr,
)
from worker.pipeline import Job, PollState, Step, error_text, failed, process
from worker.request import SafeTask
from worker.services import Services, services
from worker.settle import Settler
from worker.steps import (
    Admission,
    BackendStatus,
    MessageDeadline,
    RunningMark,
    SkipFinished,
    Started,
)

log = structlog.get_logger("worker.tasks")


class BridgeTask(SafeTask):
    """Every send carries a redacted kwargs repr (retries and polls included), and
    inspect/Flower see only that repr of a running task (``SafeRequest``)."""

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options["kwargsrepr"] = safe_kwargsrepr(kwargs)
        options["argsrepr"] = "()" if not args else f"({len(args)} args)"
        return super().apply_async(args, kwargs, **options)


def _bind(task: Task, job_id: Any, **extra: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        job_id=job_id, task_id=task.request.id, attempt=task.request.retries + 1, **extra
    )


def _steps(svc: Services, job: Job) -> list[Step]:
    if job.poll is not None:
        return [SkipFinished(svc.writeback)]
    steps: list[Step] = [Started(svc.writeback, svc.scripts), MessageDeadline()]
    if job.msg.is_batch:
        steps.append(BackendStatus(svc.backend))
    if svc.admission is not None:
        steps.append(Admission(svc.admission, svc.settings.model_turn_wait_s))
    steps.append(RunningMark(svc.marks, svc.writeback))
    return steps


def _handle(
    task: Task, raw: Any, unexpected: dict[str, Any], poll: dict[str, Any] | None = None
) -> dict[str, Any]:
    svc = services()
    batch = BatchRunner(
        svc.serve, svc.redis, svc.writeback, svc.batch_pool, svc.retry, svc.settings
    )
    settler = Settler(app, svc)
    _bind(task, readable_job_id(raw))
    job: Job | None = None
    try:
        try:
            job = _job(task, raw, unexpected, poll, svc)
        except InvalidJob as e:
            settler.quarantine(raw, str(e))
            return {"job_id": e.job_id, "status": "INVALID"}
        _bind(task, job.job_id, tenant=job.msg.tenant, model=job.msg.model)
        if job.poll is not None:
            execute = lambda j: execute_poll(svc.serve, svc.settings, svc.retry, j)  # noqa: E731
        elif job.msg.is_batch:
            execute = batch.execute
        else:
            execute = lambda j: execute_single(svc.serve, svc.coalescer, j)  # noqa: E731
        outcome = process(job, _steps(svc, job), execute)
        status = settler.settle(task, job, outcome, raw)
        return {"job_id": job.job_id, "status": status}
    except (Retry, Ignore, Reject):
        raise
    except Exception as e:
        return _settle_failed(settler, job, e, pause_s=svc.retry.delay(1))


def _settle_failed(
    settler: Settler, job: Job | None, e: Exception, pause_s: float
) -> dict[str, Any]:
    """The outcome could not be carried out. A transient cause (Redis, the broker)
    puts the message back on the queue; any other gets one try at a FAILED write
    first, so a bug cannot send the same message round for ever."""
    text = error_text(e)
    if job is not None and not is_transient(e):
        try:
            settler.finish(job, failed(f"internal error: {text}"))
            log.error("job failed on an internal error", error=text)
            return {"job_id": job.job_id, "status": "FAILED"}
        except Exception as again:
            text = error_text(again)
    log.error("could not settle the job; its message goes back to the queue", error=text)
    time.sleep(pause_s)  # no hot loop while Redis or the broker misbehave
    raise Reject(text, requeue=True) from None


def _job(
    task: Task, raw: Any, unexpected: dict[str, Any], poll: dict[str, Any] | None, svc: Services
) -> Job:
    s = svc.settings
    if unexpected:
        names = sorted(unexpected)
        raise InvalidJob(f"unexpected task arguments: {names}", readable_job_id(raw))
    msg = parse_job(raw, max_items=s.batch_max_items, max_bytes=s.max_message_bytes)
    now = time.time()
    job = Job(
        msg=msg,
        task_id=task.request.id,
        attempt=task.request.retries + 1,
        started=now,
        deadline=time.monotonic() + s.task_soft_time_limit_s,
        time_limit_s=s.task_soft_time_limit_s,
    )
    if poll is None:
        return job
    ticket, first = poll.get("ticket"), poll.get("first_pending_at")
    counts = [poll.get("polls", 0), poll.get("errors", 0), poll.get("attempt", 1)]
    if (
        not isinstance(ticket, str)
        or not isinstance(first, int | float)
        or not all(isinstance(n, int) and n >= 0 for n in counts)
    ):
        raise InvalidJob("invalid poll task: ticket, first_pending_at or counts", msg.job_id)
    started = poll.get("started")
    job.started = float(started) if isinstance(started, int | float) else now
    job.attempt = max(1, counts[2])
    job.poll = PollState(ticket, float(first), polls=counts[0], errors=counts[1])
    return job


@app.task(
    name=TASK_NAME, bind=True, base=BridgeTask, acks_late=True, max_retries=None, shared=False
)
def run(self: Task, *args: Any, job: Any = None, **unexpected: Any) -> dict[str, Any]:
    """Run one job (a single request or a batch)."""
    if args:
        unexpected["positional args"] = args
    return _handle(self, job, unexpected)


@app.task(
    name=POLL_TASK_NAME, bind=True, base=BridgeTask, acks_late=True, max_retries=None, shared=False
)
def poll(
    self: Task,
    *args: Any,
    job: Any = None,
    ticket: Any = None,
    first_pending_at: Any = None,
    started: Any = None,
    attempt: Any = 1,
    polls: Any = 0,
    errors: Any = 0,
    **unexpected: Any,
) -> dict[str, Any]:
    """Ask the replica for a deferred job's result; poll again later while pending."""
    if args:
        unexpected["positional args"] = args
    state = {
        "ticket": ticket,
        "first_pending_at": first_pending_at,
        "started": started,
        "attempt": attempt,
        "polls": polls,
        "errors": errors,
    }
    return _handle(self, job, unexpected, poll=state)


@app.task(name=FAIL_INVALID_TASK_NAME, bind=True, base=BridgeTask, acks_late=True, shared=False)
def fail_invalid(
    self: Task, *, job_id: str, error: str, tenant: str | None = None
) -> dict[str, Any]:
    """Write FAILED for a message the consumer quarantined (off the consumer thread)."""
    svc = services()
    _bind(self, job_id)
    try:
        Settler(app, svc).fail_invalid(job_id, error, tenant)
    except Exception as e:
        log.error("could not mark an invalid job FAILED; retried", error=error_text(e))
        raise Reject(error_text(e), requeue=True) from None
    return {"job_id": job_id, "status": "FAILED"}


__all__ = ["fail_invalid", "poll", "run"]
