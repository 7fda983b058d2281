"""The tasks: run an inference job, poll a deferred one, intake, flush the outbox.

A job's life: validate -> skip if already final -> infer_remote -> the final write
(once, through ``writeback``); a job still running after
``SYNAPSE_BRIDGE_RUNNING_MARK_AFTER`` is marked RUNNING meanwhile (``running_mark``).
Errors are classified: 4xx fails at once; transient errors retry with backoff and
jitter up to a bound, then the job fails and its message goes to the dead-letter
queue. A pending (deferred) answer schedules a poll task instead of holding the
worker slot.
"""

from __future__ import annotations

import os
import socket
import time
from functools import partial
from typing import Any

import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from config import get_settings
from serve_runtime.client import default_client
from serve_runtime.deferred import Pending
from serve_runtime.errors import (
    DeferredNotFound,
    ServeError,
    ServeServerError,
)
from serve_runtime.tokens import ModelKey
from worker import metrics
from worker.admission import ModelAdmission
from worker.app import app
from worker.backend_api import FINAL_STATUSES, BackendRejected, BackendUnavailable, default_backend
from worker.batch import run_batch
from worker.ledger import Ledger
from worker.message import (
    DEAD_LETTER_TASK_NAME,
    DLQ,
    INVALID_QUEUE,
    POLL_TASK_NAME,
    QUEUE,
    TASK_NAME,
    InvalidJob,
    JobMessage,
    parse_job,
    readable_job_id,
)
from worker.redis_conn import get_redis
from worker.retry import RetryPolicy
from worker.running_mark import Mark, RunningMarks
from worker.writeback import WriteBack

log = structlog.get_logger("worker.tasks")
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


def safe_kwargsrepr(kwargs: dict[str, Any] | None) -> str:
    """What events and Flower show of a task's kwargs: never the token."""
    job = (kwargs or {}).get("job")
    if isinstance(job, dict):
        return repr(
            {
                "job": {
                    "job_id": job.get("job_id"),
                    "model": job.get("model"),
                    "tenant": job.get("tenant"),
                }
            }
        )
    return "{...}"


class BridgeTask(Task):
    """Every send carries a redacted kwargs repr (retries and polls included)."""

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options["kwargsrepr"] = safe_kwargsrepr(kwargs)
        options["argsrepr"] = "()" if not args else f"({len(args)} args)"
        return super().apply_async(args, kwargs, **options)


_writeback: WriteBack | None = None


def writeback() -> WriteBack:
    global _writeback
    if _writeback is None:
        _writeback = WriteBack(default_backend(), get_redis())
    return _writeback


_running_marks: RunningMarks | None = None


def running_marks() -> RunningMarks:
    global _running_marks
    if _running_marks is None:
        _running_marks = RunningMarks(get_settings().running_mark_after_s)
    return _running_marks


_admission: ModelAdmission | None = None


def model_admission() -> ModelAdmission | None:
    """The shared admission of models, when ``SYNAPSE_BRIDGE_ACTIVE_MODELS`` is set."""
    global _admission
    settings = get_settings()
    if settings.active_models <= 0:
        return None
    if _admission is None:
        _admission = ModelAdmission(
            get_redis(),
            settings.active_models,
            idle_s=settings.model_idle_s,
            stale_s=settings.task_time_limit_s,
        )
    return _admission


_ledger: Ledger | None = None


def ledger() -> Ledger:
    global _ledger
    if _ledger is None:
        _ledger = Ledger(get_redis(), grace_s=float(get_settings().visibility_timeout_s))
    return _ledger


def queue_empty() -> bool:
    """Nothing waits in the inference queue (all priority levels)."""
    with app.connection_for_write() as conn, conn.channel() as channel:
        try:
            return int(channel.queue_declare(QUEUE, passive=True).message_count) == 0
        except Exception:
            return False


def sweep_ledger() -> int:
    from worker.submit import send_message

    def resend(wire: dict[str, Any]) -> None:
        send_message(parse_job(wire))

    return ledger().sweep(queue_empty, resend, writeback().is_done)


class TransientFailure(Exception):
    """Carried by Celery's retry; its text is already safe to log."""


def _error_text(e: BaseException) -> str:
    from config import redact_text

    return redact_text(f"{type(e).__name__}: {e}")[:2000]


def _metrics_record(
    job: JobMessage, started: float, inferred_s: float, attempt: int, **extra: Any
) -> dict[str, Any]:
    now = time.time()
    out: dict[str, Any] = {
        "attempts": attempt,
        "inference_s": round(inferred_s, 6),
        "started_at": started,
        "finished_at": now,
        "worker": WORKER_NAME,
        **extra,
    }
    if job.submitted_at is not None:
        out["submitted_at"] = job.submitted_at
        out["queue_wait_s"] = round(max(0.0, started - job.submitted_at), 6)
        out["total_s"] = round(max(0.0, now - job.submitted_at), 6)
    return out


def finish(
    job: JobMessage,
    status: str,
    *,
    result: Any = None,
    error: str | None = None,
    metrics_record: dict[str, Any] | None = None,
    progress: Any = None,
    verify: bool = True,
) -> str:
    body: dict[str, Any] = {"status": status, "result": result}
    if metrics_record is not None:
        body["metrics_record"] = metrics_record
    if progress is not None:
        body["progress_record"] = progress
    if error is not None:
        body["result"] = result if result is not None else {"error": error}
        body["console_logs"] = [{"level": "error", "message": error}]
    outcome = writeback().finalize(job.job_id, body, tenant=job.tenant, verify=verify)
    metrics.JOBS.labels(outcome=status.lower()).inc()
    if metrics_record and "total_s" in metrics_record:
        metrics.JOB_LATENCY.observe(metrics_record["total_s"])
    log.info("job finished", status=status, write=outcome, error=error)
    return outcome


def fail_invalid_job(job_id: str, error: str, tenant: str | None) -> None:
    body = {
        "status": "FAILED",
        "result": {"error": error},
        "console_logs": [{"level": "error", "message": error}],
    }
    writeback().finalize(job_id, body, tenant=tenant)
    metrics.JOBS.labels(outcome="invalid").inc()


def quarantine(raw: Any, error: str) -> None:
    """An unprocessable message: to ``inference.invalid`` with its error, job FAILED."""
    app.send_task(
        "synapse.inference.invalid",
        kwargs={"job": raw, "error": error},
        queue=INVALID_QUEUE,
        kwargsrepr=repr({"job_id": readable_job_id(raw), "error": error}),
    )
    job_id = readable_job_id(raw)
    log.error("invalid job message quarantined", job_id=job_id, error=error)
    if job_id is not None:
        tenant = raw.get("tenant") if isinstance(raw.get("tenant"), str) else None
        fail_invalid_job(job_id, error, tenant)


def dead_letter(job: JobMessage, error: str, attempts: int) -> None:
    app.send_task(
        DEAD_LETTER_TASK_NAME,
        kwargs={"job": job.wire(), "error": error, "attempts": attempts},
        queue=DLQ,
        kwargsrepr=repr({"job_id": job.job_id, "error": error, "attempts": attempts}),
    )
    metrics.DEAD_LETTERS.inc()


def _already_final(job: JobMessage) -> bool | None:
    """True when the job needs no work (final here or on the backend, or a result is
    pending delivery); False when the backend says it is not final; None when the
    backend could not tell (the final write will then check again)."""
    wb = writeback()
    done, pending = wb.state(job.job_id)
    if done:
        return True
    if pending is not None:  # computed before: deliver, never recompute
        wb.deliver(job.job_id)
        return True
    try:
        current = default_backend().get_job(job.job_id, job.tenant)
    except BackendUnavailable:
        return None  # cannot tell: run; the final write is still made once
    if current.get("status") in FINAL_STATUSES:
        log.info("job already final on the backend; skipped", status=current.get("status"))
        return True
    return False


def _bind(job_id: Any, task: Task, **extra: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        job_id=job_id, task_id=task.request.id, attempt=task.request.retries + 1, **extra
    )


def _retry_or_fail(
    task: Task, job: JobMessage, e: ServeError | BackendUnavailable, started: float, attempt: int
) -> Any:
    policy = RetryPolicy.from_settings()
    error = _error_text(e)
    if policy.exhausted(task.request.retries):
        finish(
            job,
            "FAILED",
            error=f"gave up after {attempt} attempts: {error}",
            metrics_record=_metrics_record(job, started, 0.0, attempt),
        )
        dead_letter(job, error, attempt)
        return {"job_id": job.job_id, "status": "FAILED"}
    delay = policy.delay(task.request.retries)
    metrics.RETRIES.inc()
    log.warning("transient error; retrying", error=error, retry_in_s=round(delay, 2))
    raise task.retry(countdown=delay, exc=TransientFailure(error), max_retries=None)


def _is_transient(e: ServeError) -> bool:
    # A bare 500 (a replica raising, or dying mid-request) is retried within the bound;
    # a 500 we understand (an answer that is not JSON, a bad envelope) is not.
    return e.transient or (isinstance(e, ServeServerError) and e.code is None)


@app.task(name=TASK_NAME, bind=True, base=BridgeTask, acks_late=True, max_retries=None)
def run(self: Task, *args: Any, job: Any = None, **unexpected: Any) -> dict[str, Any]:
    """Run one job; an unexpected error is retried within the bound, never swallowed."""
    try:
        return _run(self, args, job, unexpected)
    except (Retry, Ignore, Reject):
        raise
    except Exception as e:
        log.exception("unexpected error in a job", error=_error_text(e))
        try:
            msg = parse_job(job)
        except InvalidJob:
            quarantine(job, f"unexpected error: {_error_text(e)}")
            return {"job_id": readable_job_id(job), "status": "INVALID"}
        return _retry_or_fail(self, msg, e, time.time(), self.request.retries + 1)


def _run(self: Task, args: tuple[Any, ...], job: Any, unexpected: dict[str, Any]) -> dict[str, Any]:
    started = time.time()
    attempt = self.request.retries + 1
    _bind(readable_job_id(job), self)
    settings = get_settings()
    try:
        if args or unexpected:
            names = sorted(unexpected) + (["positional args"] if args else [])
            raise InvalidJob(f"unexpected task arguments: {names}", readable_job_id(job))
        msg = parse_job(
            job, max_items=settings.batch_max_items, max_bytes=settings.max_message_bytes
        )
    except InvalidJob as e:
        quarantine(job, str(e))
        return {"job_id": e.job_id, "status": "INVALID"}
    _bind(msg.job_id, self, tenant=msg.tenant, model=msg.model)
    ledger().started(msg.job_id)  # from here on, the broker's redelivery covers it
    admission = model_admission()
    model_key = str(ModelKey(tenant=msg.tenant, model=str(msg.model)))  # Serve's routing key
    if admission is not None and not admission.enter(model_key):
        return wait_for_model(msg)
    try:
        return _admitted(self, msg, started=started, attempt=attempt)
    finally:
        if admission is not None:
            admission.leave(model_key)


def wait_for_model(msg: JobMessage) -> dict[str, Any]:
    """Back to the end of the queue (ledger first, as any send): its model must wait."""
    from worker.submit import send_message

    time.sleep(min(0.1, get_settings().model_idle_s))  # no hot loop while models drain
    send_message(msg)
    metrics.MODEL_WAITS.inc()
    return {"job_id": msg.job_id, "status": "WAITING_FOR_MODEL"}


def _admitted(self: Task, msg: JobMessage, *, started: float, attempt: int) -> dict[str, Any]:
    final = _already_final(msg)
    if final:
        return {"job_id": msg.job_id, "status": "SKIPPED"}
    if msg.expired():
        finish(msg, "FAILED", error="deadline passed before the job could run")
        return {"job_id": msg.job_id, "status": "FAILED"}
    running = {
        "status": "RUNNING",
        "meta": {"attempt": attempt, "task_id": self.request.id, "worker": WORKER_NAME},
    }
    mark = running_marks().arm(partial(writeback().update, msg.job_id, running, tenant=msg.tenant))
    try:
        return _attempt(self, msg, mark, started=started, attempt=attempt, final=final)
    finally:
        mark.disarm()  # before run()'s own handler can write a final status


def _attempt(
    self: Task, msg: JobMessage, mark: Mark, *, started: float, attempt: int, final: bool | None
) -> dict[str, Any]:
    """Inference and the final write; every final write comes after ``mark.disarm()``."""
    try:
        if msg.is_batch:
            mark.write_now()  # long work, with progress writes to come: RUNNING first
            return run_batch(self, msg, started=started, attempt=attempt)
        t0 = time.perf_counter()
        out = default_client().infer(
            msg.release.route_prefix,
            msg.body,
            model=msg.model,
            token=msg.token.get_secret_value(),
            tenant=msg.tenant,
            method=msg.method,
        )
        inferred = time.perf_counter() - t0
        metrics.INFERENCE_LATENCY.observe(inferred)
    except SoftTimeLimitExceeded:
        mark.disarm()
        finish(
            msg,
            "FAILED",
            error="time limit exceeded",
            metrics_record=_metrics_record(msg, started, time.time() - started, attempt),
        )
        return {"job_id": msg.job_id, "status": "FAILED"}
    except ServeError as e:
        mark.disarm()
        if _is_transient(e):
            return _retry_or_fail(self, msg, e, started, attempt)
        finish(
            msg,
            "FAILED",
            error=_error_text(e),
            metrics_record=_metrics_record(msg, started, 0.0, attempt),
        )
        return {"job_id": msg.job_id, "status": "FAILED"}
    if isinstance(out, Pending):
        mark.write_now()  # running on the replica, for longer than this task
        schedule_poll(
            msg, out.ticket, first_pending_at=time.time(), started=started, attempt=attempt
        )
        return {"job_id": msg.job_id, "status": "DEFERRED"}
    # The status was read from the backend at the start of this attempt (final is
    # False, not None): the write needs no second look, saving a GET per job.
    mark.disarm()
    finish(
        msg,
        "SUCCEEDED",
        result=out,
        metrics_record=_metrics_record(msg, started, inferred, attempt),
        verify=final is not False,
    )
    return {"job_id": msg.job_id, "status": "SUCCEEDED"}


def schedule_poll(
    msg: JobMessage,
    ticket: str,
    *,
    first_pending_at: float,
    started: float,
    attempt: int,
    polls: int = 0,
    countdown: float | None = None,
) -> None:
    poll.apply_async(
        kwargs={
            "job": msg.wire(),
            "ticket": ticket,
            "first_pending_at": first_pending_at,
            "started": started,
            "attempt": attempt,
            "polls": polls,
        },
        countdown=get_settings().deferred_poll_interval_s if countdown is None else countdown,
        priority=msg.priority,
    )


# A poll that meets a transient error costs a tenth of a retry: polls are cheap and
# frequent, so ten failed polls in a row count as one failed attempt of the job.
POLL_ERRORS_PER_RETRY = 10


@app.task(name=POLL_TASK_NAME, bind=True, base=BridgeTask, acks_late=True, max_retries=None)
def poll(
    self: Task,
    *,
    job: dict[str, Any],
    ticket: str,
    first_pending_at: float,
    started: float,
    attempt: int,
    polls: int = 0,
) -> dict[str, Any]:
    msg = parse_job(job)
    _bind(msg.job_id, self, tenant=msg.tenant, model=msg.model, polls=polls)
    if writeback().is_done(msg.job_id):
        return {"job_id": msg.job_id, "status": "SKIPPED"}
    settings = get_settings()
    countdown: float | None = None  # None: the regular poll interval
    try:
        out: Any = default_client().poll(
            msg.release.route_prefix,
            ticket,
            model=msg.model,
            token=msg.token.get_secret_value(),
            tenant=msg.tenant,
        )
    except DeferredNotFound:
        log.warning("deferred ticket lost (replica restarted?); submitting the job again")
        run.apply_async(kwargs={"job": job}, priority=msg.priority)
        return {"job_id": msg.job_id, "status": "RESUBMITTED"}
    except ServeError as e:
        policy = RetryPolicy.from_settings()
        if not _is_transient(e) or policy.exhausted(polls // POLL_ERRORS_PER_RETRY):
            finish(
                msg,
                "FAILED",
                error=_error_text(e),
                metrics_record=_metrics_record(msg, started, time.time() - started, attempt),
            )
            return {"job_id": msg.job_id, "status": "FAILED"}
        out, countdown = None, policy.delay(min(polls, 6))  # poll again, backing off
    if out is None or isinstance(out, Pending):
        if out is not None and time.time() - first_pending_at > settings.deferred_max_wait_s:
            finish(
                msg,
                "FAILED",
                error=f"deferred result not ready within {settings.deferred_max_wait_s:.0f}s",
            )
            return {"job_id": msg.job_id, "status": "FAILED"}
        schedule_poll(
            msg,
            ticket,
            first_pending_at=first_pending_at,
            started=started,
            attempt=attempt,
            polls=polls + 1,
            countdown=countdown,
        )
        return {"job_id": msg.job_id, "status": "DEFERRED"}
    finish(
        msg,
        "SUCCEEDED",
        result=out,
        metrics_record=_metrics_record(
            msg, started, time.time() - first_pending_at, attempt, polls=polls + 1, deferred=True
        ),
    )
    return {"job_id": msg.job_id, "status": "SUCCEEDED"}


@app.task(name="synapse.outbox.flush", ignore_result=True)
def flush_outbox() -> dict[str, int]:
    return writeback().flush()


@app.task(name="synapse.intake.poll", ignore_result=True)
def intake_poll() -> int:
    from worker.intake import Intake

    return Intake.from_settings().poll_once()


__all__ = ["BackendRejected", "flush_outbox", "intake_poll", "poll", "run"]
