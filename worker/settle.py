"""What an outcome means for the backend and the broker, decided in one place.

``Finished`` -> the final write (once, through ``writeback``); ``TryAgain`` -> a retry
with backoff within the bound, then FAILED and the dead-letter queue; ``Deferred`` -> a
poll task scheduled; ``Requeued`` -> the job back on the queue as a new message
(ledger first); ``Skipped`` -> nothing. Every message we publish carries the job's
wire form, whose token is sealed; the dead-letter and invalid queues get copies with
no token at all.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery import Celery, Task

from worker import metrics
from worker.batch import forget_checkpoint
from worker.inference import poll_errors_exhausted
from worker.message import (
    DEAD_LETTER_TASK_NAME,
    DLQ,
    INVALID_QUEUE,
    POLL_TASK_NAME,
    JobMessage,
    readable_job_id,
    redacted,
    safe_kwargsrepr,
)
from worker.pipeline import (
    Deferred,
    Finished,
    Job,
    Outcome,
    PollState,
    Rejected,
    Requeued,
    Skipped,
    TryAgain,
    failed,
)
from worker.services import Services
from worker.steps import WORKER_NAME
from worker.submit import send_message

log = structlog.get_logger("worker.settle")


class TransientFailure(Exception):
    """Carried by Celery's retry; its text is already safe to log."""


class Settler:
    def __init__(self, app: Celery, svc: Services) -> None:
        self.app = app
        self.svc = svc

    def settle(self, task: Task, job: Job, outcome: Outcome, raw: Any) -> str:
        """Carry ``outcome`` out and say what became of the job (the task's result).

        Raises Celery's ``Retry`` after scheduling a retry.
        """
        if isinstance(outcome, Finished):
            write = self.finish(job, outcome)
            if write == "unknown_job":  # the backend does not know this job: a wrong message
                self.quarantine(raw, f"the backend refused job {job.job_id}", fail_job=False)
                return Rejected.status
            return {"already_final": "SKIPPED", "failed_instead": "FAILED"}.get(
                write, outcome.status
            )
        if isinstance(outcome, TryAgain):
            self.retry_or_fail(task, job, outcome.error)
        elif isinstance(outcome, Deferred):
            self.schedule_poll(job, outcome)
        elif isinstance(outcome, Requeued):
            self.requeue(job.msg, outcome.reason, model_wait=not outcome.resubmit)
        elif isinstance(outcome, Rejected):
            self.quarantine(raw, outcome.reason, fail_job=False)
        elif isinstance(outcome, Skipped):
            log.info("job skipped", reason=outcome.reason)
        return outcome.status

    # -- the final write

    def finish(self, job: Job, outcome: Finished) -> str:
        record = metrics_record(job, outcome)
        body: dict[str, Any] = {
            "status": outcome.status,
            "result": outcome.result,
            "metrics_record": record,
        }
        if outcome.progress is not None:
            body["progress_record"] = outcome.progress
        if outcome.error is not None:
            if outcome.result is None:
                body["result"] = {"error": outcome.error}
            body["console_logs"] = [{"level": "error", "message": outcome.error}]
        write = self.svc.writeback.finalize(job.job_id, body, tenant=job.msg.tenant)
        if job.msg.is_batch:
            forget_checkpoint(self.svc.redis, job.job_id)
        if write in ("already_final", "failed_instead", "dead", "unknown_job"):
            metrics.JOBS.labels(outcome=write).inc()  # not the outcome computed
        else:
            metrics.JOBS.labels(outcome=outcome.status.lower()).inc()
            metrics.JOB_LATENCY.observe(record.get("total_s", time.time() - job.started))
        log.info("job finished", status=outcome.status, write=write, error=outcome.error)
        return write

    # -- retries

    def retry_or_fail(self, task: Task, job: Job, error: str) -> None:
        if job.poll is not None:  # a poll that failed unexpectedly counts as a poll error
            state = job.poll
            if poll_errors_exhausted(state.errors + 1, self.svc.retry):
                self.finish(job, failed(f"gave up polling after {state.errors + 1} errors"))
                return
            self.schedule_poll(
                job,
                Deferred(
                    PollState(state.ticket, state.first_pending_at, state.polls, state.errors + 1),
                    countdown=self.svc.retry.delay(min(state.errors, 6)),
                ),
            )
            return
        policy = self.svc.retry
        if policy.exhausted(job.attempt - 1):
            self.finish(job, failed(f"gave up after {job.attempt} attempts: {error}"))
            self.dead_letter(job.msg, error, job.attempt)
            return
        delay = policy.delay(job.attempt - 1)
        metrics.RETRIES.inc()
        log.warning("transient error; retrying", error=error, retry_in_s=round(delay, 2))
        # The retry carries the job's wire form (sealed token), not the kwargs received.
        raise task.retry(
            kwargs={"job": job.msg.wire()},
            countdown=delay,
            exc=TransientFailure(error),
            max_retries=None,
        )

    def dead_letter(self, msg: JobMessage, error: str, attempts: int) -> None:
        self.app.send_task(
            DEAD_LETTER_TASK_NAME,
            kwargs={"job": redacted(msg.wire()), "error": error, "attempts": attempts},
            queue=DLQ,
            kwargsrepr=repr({"job_id": msg.job_id, "error": error, "attempts": attempts}),
        )
        metrics.DEAD_LETTERS.inc()

    # -- deferred work and requeues

    def schedule_poll(self, job: Job, deferred: Deferred) -> None:
        state = deferred.poll
        kwargs = {
            "job": job.msg.wire(),
            "ticket": state.ticket,
            "first_pending_at": state.first_pending_at,
            "started": job.started,
            "attempt": job.attempt,
            "polls": state.polls,
            "errors": state.errors,
        }
        countdown = deferred.countdown
        if countdown is None:
            countdown = self.svc.settings.deferred_poll_interval_s
        self.app.send_task(
            POLL_TASK_NAME,
            kwargs=kwargs,
            countdown=countdown,
            priority=job.msg.priority,
            kwargsrepr=safe_kwargsrepr(kwargs),
            argsrepr="()",
        )

    def requeue(self, msg: JobMessage, reason: str, *, model_wait: bool = True) -> None:
        send_message(msg, app=self.app, ledger=self.svc.ledger)
        if model_wait:
            metrics.MODEL_WAITS.inc()
        log.info("job back on the queue", reason=reason)

    # -- messages that cannot be processed

    def quarantine(self, raw: Any, error: str, *, fail_job: bool = True) -> None:
        """To ``inference.invalid`` (no token in it), and the job FAILED when it has an id."""
        job_id = readable_job_id(raw)
        self.app.send_task(
            "synapse.inference.invalid",
            kwargs={"job": redacted(raw), "error": error},
            queue=INVALID_QUEUE,
            kwargsrepr=repr({"job_id": job_id, "error": error}),
        )
        log.error("invalid job message quarantined", job_id=job_id, error=error)
        if job_id is not None and fail_job:
            tenant = raw.get("tenant") if isinstance(raw.get("tenant"), str) else None
            self.fail_invalid(job_id, error, tenant)

    def fail_invalid(self, job_id: str, error: str, tenant: str | None) -> None:
        body = {
            "status": "FAILED",
            "result": {"error": error},
            "console_logs": [{"level": "error", "message": error}],
        }
        self.svc.writeback.finalize(job_id, body, tenant=tenant)
        metrics.JOBS.labels(outcome="invalid").inc()


def metrics_record(job: Job, outcome: Finished) -> dict[str, Any]:
    now = time.time()
    out: dict[str, Any] = {
        "attempts": job.attempt,
        "inference_s": round(outcome.inference_s, 6),
        "started_at": job.started,
        "finished_at": now,
        "worker": WORKER_NAME,
        **outcome.metrics,
    }
    submitted = job.msg.submitted_at
    if submitted is not None:
        out["submitted_at"] = submitted
        out["queue_wait_s"] = round(max(0.0, job.started - submitted), 6)
        out["total_s"] = round(max(0.0, now - submitted), 6)
    return out
