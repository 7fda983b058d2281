"""The Celery app: ``celery -A worker.app worker`` works, as does ``synapse-bridge worker``.

Delivery is at least once (late acks, reject on worker lost, prefetch 1, a visibility
timeout longer than the longest job); effects on the backend are made once by
``writeback``. JSON only: anything else is quarantined, never unpickled.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from config import Settings, get_settings
from worker.message import DLQ, INVALID_QUEUE, QUEUE


def _transport(broker: str) -> dict[str, str]:
    """Our Redis transport (one client per channel) for ``redis://``; else kombu's."""
    from worker.redis_transport import TRANSPORT

    return {"broker_transport": TRANSPORT} if broker.startswith("redis://") else {}


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("synapse_bridge", broker=settings.broker, backend=settings.redis)
    default = Exchange(QUEUE, type="direct")
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_default_exchange=QUEUE,
        task_default_routing_key=QUEUE,
        task_queues=[
            Queue(QUEUE, default, routing_key=QUEUE, queue_arguments={"x-max-priority": 10}),
            Queue(DLQ, default, routing_key=DLQ),
            Queue(INVALID_QUEUE, default, routing_key=INVALID_QUEUE),
        ],
        task_default_priority=5,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
        },
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        # The backend holds the results; Celery's copy is opt-in (it costs a Redis key
        # per job for result_expires).
        task_ignore_result=not settings.store_results,
        result_expires=24 * 3600,
        result_extended=False,  # never store task kwargs (tokens) in the result backend
        # Task events (Flower) cost ~4% of the worker's CPU per job: opt-in, as in Celery.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_consumer="worker.consumer:QuarantiningConsumer",
        worker_concurrency=settings.worker_concurrency,
        worker_pool="threads",
        broker_connection_retry_on_startup=True,
        **_transport(settings.broker),
        imports=["worker.tasks", "worker.lifecycle"],
    )
    return celery


app = create_app()
