"""The worker's Redis client: outbox, done markers, ledger, checkpoints, admission."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# redis-py's own default; a worker with more threads gets one connection per thread.
MIN_CONNECTIONS = 100
# A caller finding every connection in use waits this long for one, then gets a
# ConnectionError (transient: its job's message goes back to the queue).
POOL_WAIT_S = 20.0


def connect_redis(url: str, max_connections: int = MIN_CONNECTIONS) -> redis.Redis:
    """A pooled, thread-safe client that rides out a broker restart.

    A command that meets a dropped connection is retried with backoff for about 30 s
    before it raises (then the task's handler puts the message back on the queue).
    The pool blocks instead of failing when all its connections are in use: redis-py's
    default pool raises ``MaxConnectionsError`` at once to the 101st caller, outside
    its retries (tests/test_redis_conn.py).
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max(MIN_CONNECTIONS, max_connections),
        timeout=POOL_WAIT_S,
        decode_responses=True,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    return redis.Redis.from_pool(pool)  # closing the client closes the pool
