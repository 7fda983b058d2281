"""The worker's Redis client: outbox, done markers, ledger, checkpoints, admission."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect_redis(url: str) -> redis.Redis:
    """A pooled, thread-safe client that rides out a broker restart.

    A command that meets a dropped connection is retried with backoff for about 30 s
    before it raises (then the task's handler puts the message back on the queue).
    """
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
