"""The Celery app: ``celery -A worker.app worker`` works, as does ``synapse-bridge worker``.

Delivery is at least once (late acks, reject on worker lost, prefetch 1, a visibility
timeout longer than the longest job); effects on the backend are made once by
``writeback``. JSON only: anything else is quarantined, never unpickled.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from config import Settings, get_settings
from worker.message import DLQ, INVALID_QUEUE, QUEUE
from worker.redis_transport import TRANSPORT


def _transport(broker: str) -> dict[str, str]:
    """Our Redis transport (one client per channel) for ``redis://``; else kombu's."""
    return {"broker_transport": TRANSPORT} if broker.startswith("redis://") else {}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration of a bridge app, from our settings."""
    default = Exchange(QUEUE, type="direct")
    return dict(
        broker_url=settings.broker,
        result_backend=settings.redis,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # Celery lowers a reconnected worker's prefetch and raises it from each late
        # ack, i.e. from our pool's threads: a synchronous basic_qos on the consumer's
        # AMQP connection, read by several threads at once, which deadlocks the worker
        # until the broker drops it (tests/test_broker_restart.py). Prefetch is 1 a
        # thread anyway; reconnecting at full prefetch only queues jobs for threads.
        worker_enable_prefetch_count_reduction=False,
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


def create_app(settings: Settings | None = None) -> Celery:
    """A bridge app configured now (a producer for another broker, say)."""
    celery = Celery("synapse_bridge", task_cls="worker.request:SafeTask")
    celery.conf.update(celery_config(settings or get_settings()))
    return celery


# The process's app is configured when it is first used, not when it is imported:
# importing a module that defines tasks must not freeze the settings of the moment.
app = Celery("synapse_bridge", task_cls="worker.request:SafeTask")  # inspect shows no kwargs


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))
