"""A Celery consumer that quarantines what it cannot run instead of dropping it.

Celery's default consumer acks (drops) an undecodable message and logs its body; a
pickle message, an unknown task or a malformed envelope would vanish, and a token in
the body would reach the log. Here each goes to ``inference.invalid`` with the reason
in a header, and only the reason is logged.

What is kept: the same envelope, headers and properties, with every token redacted
(``worker.message.redacted``: token fields, sealed tokens, JWT/Bearer strings, in the
body and the headers, e.g. an outside producer's ``kwargsrepr``). A body that decodes
as JSON (in its declared encoding) is re-encoded redacted; a body that does not decode
(YAML, msgpack, pickle, broken JSON) is kept as it came: it cannot be parsed to find a
token, so it may hold one, and the invalid queue is for operators only.

No backend call is made here: this runs on Celery's consumer thread, and one slow
backend call would stall all consumption. When a job id can be read, a small task
(``synapse.inference.fail_invalid``, kwargs ``job_id``, ``error``, ``tenant``) is
published to the main queue, and a pool thread writes the job FAILED.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

import structlog
from celery.worker.consumer import Consumer
from kombu import Queue
from kombu.exceptions import ContentDisallowed

from worker.message import FAIL_INVALID_TASK_NAME, INVALID_QUEUE, QUEUE, readable_job_id, redacted

log = structlog.get_logger("worker.consumer")

REASON_HEADER = "x-synapse-invalid-reason"


def quarantine_raw(app: Any, message: Any, reason: str) -> None:
    """Publish a token-free copy of ``message`` to the invalid queue, ask for its job to
    be failed (a task message, not a backend call), then ack it."""
    body, content_encoding = _redacted_body(message)
    headers = redacted(dict(message.headers or {}))
    headers[REASON_HEADER] = reason
    job_id, tenant = _job_of(message)
    try:
        with app.producer_or_acquire() as producer:
            producer.publish(
                body,
                exchange="",
                routing_key=INVALID_QUEUE,
                content_type=message.content_type or "application/octet-stream",
                content_encoding=content_encoding,
                headers=headers,
                declare=[Queue(INVALID_QUEUE)],
                retry=True,
            )
            if job_id is not None:
                fail = {"job_id": job_id, "error": reason, "tenant": tenant}
                app.send_task(
                    FAIL_INVALID_TASK_NAME,
                    kwargs=fail,
                    queue=QUEUE,
                    producer=producer,
                    argsrepr="()",
                    kwargsrepr=repr(fail),
                )
    except Exception as e:
        # Not quarantined (or its job not to be failed): leave it for redelivery rather
        # than lose it; at worst the invalid queue gets a second copy.
        log.error(
            "could not quarantine an invalid message; it stays on the queue",
            reason=reason,
            job_id=job_id,
            error=type(e).__name__,
        )
        message.reject(requeue=True)
        return
    message.ack()
    log.error("message quarantined", queue=INVALID_QUEUE, reason=reason, job_id=job_id)


def _redacted_body(message: Any) -> tuple[Any, str]:
    """The body with its tokens redacted, and its content encoding; as it came when it
    does not decode as JSON."""
    raw = message.body
    encoding = message.content_encoding or "binary"
    if message.content_type != "application/json":
        return raw, encoding
    try:
        codec = codecs.lookup(encoding).name if encoding != "binary" else "utf-8"
        text = raw.decode(codec) if isinstance(raw, bytes | bytearray) else raw
        decoded = json.loads(text)
        # ensure_ascii: the text is ASCII, so it encodes in the declared codec.
        return json.dumps(redacted(decoded)).encode(codec), encoding
    except Exception:
        return raw, encoding


def _job_of(message: Any) -> tuple[str | None, str | None]:
    """The job id and tenant a (JSON) task message carries, if they can be read."""
    try:
        if message.content_type != "application/json":
            return None, None
        body = json.loads(message.body)
        kwargs = body[1] if isinstance(body, list) and len(body) > 1 else {}
        job = kwargs.get("job") if isinstance(kwargs, dict) else None
        job_id = readable_job_id(job)
        if job_id is None:
            return None, None
        tenant = job.get("tenant")
        ok = isinstance(tenant, str) and 0 < len(tenant) <= 100
        return job_id, tenant if ok else None
    except Exception:
        return None, None


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
