"""A Celery consumer that quarantines what it cannot run instead of dropping it.

Celery's default consumer acks (drops) an undecodable message and logs its body; a
pickle message, an unknown task or a malformed envelope would vanish, and a token in
the body would reach the log. Here each goes, byte for byte, to ``inference.invalid``
with the reason in a header, and only the reason is logged.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from celery.worker.consumer import Consumer
from kombu import Queue

from worker.message import INVALID_QUEUE, readable_job_id

log = structlog.get_logger("worker.consumer")

REASON_HEADER = "x-synapse-invalid-reason"


def quarantine_raw(app: Any, message: Any, reason: str) -> None:
    """Publish ``message`` unchanged to the invalid queue, then ack it."""
    headers = dict(message.headers or {})
    headers[REASON_HEADER] = reason
    try:
        with app.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                exchange="",
                routing_key=INVALID_QUEUE,
                content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
                headers=headers,
                declare=[Queue(INVALID_QUEUE)],
                retry=True,
            )
    except Exception as e:
        # Not quarantined: leave it for redelivery rather than lose it.
        log.error(
            "could not quarantine an invalid message; it stays on the queue",
            reason=reason,
            error=type(e).__name__,
        )
        message.reject(requeue=True)
        return
    message.ack()
    log.error("message quarantined", queue=INVALID_QUEUE, reason=reason, job_id=_job_id_of(message))
    _fail_job(message, reason)


def _job_id_of(message: Any) -> str | None:
    try:
        if message.content_type != "application/json":
            return None
        body = json.loads(message.body)
        kwargs = body[1] if isinstance(body, list) and len(body) > 1 else {}
        return readable_job_id(kwargs.get("job")) if isinstance(kwargs, dict) else None
    except Exception:
        return None


def _fail_job(message: Any, reason: str) -> None:
    job_id = _job_id_of(message)
    if job_id is None:
        return
    try:
        from worker.tasks import fail_invalid_job

        fail_invalid_job(job_id, reason, tenant=None)
    except Exception as e:
        log.warning("could not mark the invalid job FAILED", job_id=job_id, error=type(e).__name__)


class QuarantiningConsumer(Consumer):
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        quarantine_raw(self.app, message, f"undecodable message: {type(exc).__name__}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        quarantine_raw(self.app, message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task", "?")
        quarantine_raw(self.app, message, f"unknown task {str(name)[:100]!r}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        kind = type(exc).__name__
        if kind == "ContentDisallowed":
            reason = f"content type {message.content_type!r} refused (JSON only)"
        else:
            reason = f"invalid task message: {kind}"
        quarantine_raw(self.app, message, reason)
