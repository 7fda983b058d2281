"""One Redis client per process for the outbox, claims and checkpoints."""

from __future__ import annotations

import threading

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from config import get_settings

_client: redis.Redis | None = None
_lock = threading.Lock()


def get_redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            # Ride out a broker restart: a command that meets a dropped connection is
            # retried with backoff for about 30 s before it raises.
            _client = redis.Redis.from_url(
                get_settings().redis,
                decode_responses=True,
                socket_timeout=10,
                socket_connect_timeout=5,
                health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 20),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            )
        return _client


def reset_redis() -> None:
    global _client
    with _lock:
        if _client is not None:
            _client.close()
        _client = None
