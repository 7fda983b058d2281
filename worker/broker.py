"""How many messages wait in a queue, on Redis or AMQP (placeholder until the ledger work lands)."""

from __future__ import annotations

from celery import Celery


def queued(app: Celery, queue: str) -> int | None:
    """Messages waiting in ``queue`` (all priority levels), or None when it cannot tell."""
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            client = getattr(channel, "client", None)
            if client is not None and conn.transport_cls.endswith("Transport"):
                pass
            if conn.transport.driver_type == "redis":
                names = [queue, *(f"{queue}:{p}" for p in range(1, 10))]
                return sum(int(channel.client.llen(n)) for n in names)
            return int(channel.queue_declare(queue, passive=True).message_count)
    except Exception:
        return None
