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
from kombu.exceptions import ContentDisallowed

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


def _task_body_problem(message: Any) -> str | None:
    """Why a message with Celery task headers cannot be a task, or None when it can.

    Checked before Celery's own handler sees it: an empty body or a body that is not
    ``[args, kwargs, embed]`` would otherwise raise inside the consumer loop, and an
    error there stops the whole worker ("Unrecoverable error"), then the message is
    restored and the next worker dies on it too.
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # Celery's paths for protocol 1 and non-task messages apply
    try:
        body = message.decode()  # cached: Celery's handler reuses it
    except ContentDisallowed:
        return f"content type {message.content_type!r} refused (JSON only)"
    except Exception as exc:
        return f"undecodable message: {type(exc).__name__}"
    if not (
        isinstance(body, list | tuple)
        and len(body) == 3
        and isinstance(body[0], list | tuple)
        and isinstance(body[1], dict)
        and (body[2] is None or isinstance(body[2], dict))
    ):
        return "invalid task message: the body is not [args, kwargs, embed]"
    return None


class QuarantiningConsumer(Consumer):
    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors or ())

        def on_task_received(message: Any) -> Any:
            problem = _task_body_problem(message)
            if problem is not None:
                return quarantine_raw(self.app, message, problem)
            try:
                return handler(message)
            except connection_errors:
                raise  # the consumer reconnects; the message is redelivered
            except Exception as exc:
                # Never let one message stop the consumer loop (and the worker).
                if message.acknowledged:
                    log.error("error handling a task message", error=type(exc).__name__)
                    return None
                return quarantine_raw(
                    self.app, message, f"invalid task message: {type(exc).__name__}"
                )

        return on_task_received

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
