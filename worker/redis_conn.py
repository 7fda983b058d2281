"""One Redis client per process for the outbox, claims and checkpoints."""

from __future__ import annotations

import threading

import redis

from config import get_settings

_client: redis.Redis | None = None
_lock = threading.Lock()


def get_redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(
                get_settings().redis,
                decode_responses=True,
                socket_timeout=10,
                socket_connect_timeout=5,
                health_check_interval=30,
                retry_on_timeout=True,
            )
        return _client


def reset_redis() -> None:
    global _client
    with _lock:
        if _client is not None:
            _client.close()
        _client = None
