"""What a worker process starts beside its pool: logging, housekeeping, metrics.

Housekeeping is one thread per worker process: it delivers the outbox and sweeps the
submission ledger every ``SYNAPSE_BRIDGE_OUTBOX_FLUSH_INTERVAL`` seconds.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import structlog
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from config import configure_logging, get_settings
from worker import metrics
from worker.app import app
from worker.broker import queued
from worker.message import DLQ, INVALID_QUEUE, QUEUE, parse_job
from worker.sealing import sealer
from worker.services import Services, services
from worker.submit import send_message
from worker.writeback import Flusher

log = structlog.get_logger("worker.lifecycle")
_flusher: Flusher | None = None
_flusher_lock = threading.Lock()


def sweep_ledger(svc: Services) -> int:
    """Republish jobs lost between the broker's pop and the worker's unacked record."""

    def resend(wire: dict[str, Any]) -> None:
        send_message(parse_job(wire), app=app, ledger=svc.ledger)

    return svc.ledger.sweep(lambda: queued(app, QUEUE), resend, svc.writeback.is_done)


def _start(**_: Any) -> None:
    """Set the process up; when it cannot be, stop the worker with status 1.

    Celery logs an exception raised in a ``worker_ready`` handler and goes on, so a
    worker missing a setting would consume jobs it cannot run, with no outbox delivery
    and no ledger sweep. ``SystemExit`` is not swallowed: the worker shuts down, and
    the messages it took go back to the queue.
    """
    try:
        _set_up()
    except Exception as e:
        # The messages name the setting to fix, never its value (secrets stay out).
        log.error("worker_cannot_start", error=f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


def _set_up() -> None:
    global _flusher
    svc = services()
    settings = svc.settings
    configure_logging(settings.log_format, settings.log_level)
    sealer(settings)  # a missing or malformed sealing key stops the worker here, named
    metrics.serve_metrics(settings.metrics_port, [QUEUE, DLQ, INVALID_QUEUE], svc.redis)

    def ledger_sweep() -> int:  # named: housekeeping logs name their chores
        return sweep_ledger(svc)

    with _flusher_lock:
        if _flusher is None:
            _flusher = Flusher(svc.writeback, settings.outbox_flush_interval_s, [ledger_sweep])
            _flusher.start()
    if settings.ready_file is not None:  # for probes and supervisors
        settings.ready_file.write_text(str(os.getpid()))
    log.info("worker ready", concurrency=settings.worker_concurrency)


def _stop(**_: Any) -> None:
    if _flusher is not None:
        _flusher.stop()
    ready = get_settings().ready_file
    if ready is not None:
        ready.unlink(missing_ok=True)


worker_ready.connect(_start, weak=False)
worker_process_init.connect(_start, weak=False)  # prefork children (threads: not sent)
worker_shutdown.connect(_stop, weak=False)
