"""What a worker process starts beside its pool: logging, the outbox flusher, metrics."""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from config import configure_logging, get_settings
from worker.message import QUEUE

log = structlog.get_logger("worker.lifecycle")
_flusher: Any = None


def _start(**_: Any) -> None:
    global _flusher
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    from worker import metrics
    from worker.tasks import sweep_ledger, writeback
    from worker.writeback import Flusher

    metrics.serve_metrics(settings.metrics_port, [QUEUE])
    if _flusher is None:
        _flusher = Flusher(writeback(), settings.outbox_flush_interval_s, [sweep_ledger])
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
