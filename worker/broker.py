"""How many messages wait in a queue, asked of the app's own broker connection.

Redis: kombu keeps a queue as one list per priority step (``_q_for_pri``: the queue's
name for the first step, ``{queue}{sep}{step}`` for the others; with our
``priority_steps`` 0..9 and ``sep`` ":", ``inference`` and ``inference:1`` ..
``inference:9``), and Redis deletes a list once it is empty. So a passive
``queue_declare`` there raises for an empty queue: it cannot say "0". We sum LLEN over
the channel's own key names (its client also applies any ``global_keyprefix``); a
queue with no list at all holds 0 messages.

AMQP: a passive ``queue_declare`` gives the ready messages of the queue (all
priorities; unacked ones are not counted). A queue that does not exist is an error
there, not 0: the answer is None.

Anything else (another transport, a broker that does not answer): None, "cannot
tell". Messages a worker holds (reserved, ETA) are in no queue and are not counted.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery

log = structlog.get_logger("worker.broker")


def _redis_queued(channel: Any, queue: str) -> int:
    keys = list(dict.fromkeys(channel._q_for_pri(queue, p) for p in channel.priority_steps))
    with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())


def _amqp_queued(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue=queue, passive=True).message_count)


def queued(app: Celery, queue: str) -> int | None:
    """Messages waiting in ``queue`` (all priority levels), or None when it cannot tell."""
    try:
        with app.connection_for_write() as conn:
            driver = conn.transport.driver_type
            if driver not in ("redis", "amqp"):
                return None
            channel = conn.default_channel
            if driver == "redis":
                return _redis_queued(channel, queue)
            return _amqp_queued(channel, queue)
    except Exception as e:  # unreachable broker, missing AMQP queue: cannot tell
        log.info("queue depth unknown", queue=queue, error=type(e).__name__)
        return None


__all__ = ["queued"]
