"""The worker's Redis transport over a broker restart (real redis-server, real kombu).

Celery's consumer, on losing the broker, ``collect()``s its connection and then
``close()``s it. ``collect`` makes kombu forget the transport's connection info. When
the consumer's channel was waiting in BRPOP and a broadcast channel (the worker's
remote-control one: a fanout, auto-delete queue) fails to close first, the consumer's
channel is only closed on the second pass, and that close must still reach Redis to
put its unacknowledged messages back.
Before the fix that close raised ``AttributeError`` (not a connection error), Celery
logged "Unrecoverable error" and the worker stopped consuming: R4 in CI, 1,376 of
2,000 jobs never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from kombu.common import ignore_errors

from devtools.redis_server import RedisServer
from worker.redis_transport import TRANSPORT

QUEUE = Queue("transport-test", Exchange("transport-test"), routing_key="transport-test")
BROADCAST = Queue("transport-bcast", Exchange("transport-bcast", type="fanout"), auto_delete=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True, workdir=tmp_path / "redis").start()
    yield server
    server.close()


def _connection(url: str) -> Connection:
    return Connection(url, transport=TRANSPORT, transport_options={"visibility_timeout": 3600})


def _deliver_one_unacked(conn: Connection) -> list[Any]:
    """Publish one message and take it without acking (it is then the channel's)."""
    conn.Producer().publish(
        {"n": 1}, exchange=QUEUE.exchange, routing_key="transport-test", declare=[QUEUE]
    )
    got: list[Any] = []
    conn.Consumer(QUEUE, callbacks=[lambda body, message: got.append(body)]).consume()
    conn.drain_events(timeout=5)
    assert got == [{"n": 1}]
    return got


def _lose_redis_while_waiting(conn: Connection, server: RedisServer) -> None:
    """The worker's state when Redis goes: its task channel waits in BRPOP holding an
    unacked message, its broadcast channel consumes a fanout queue; then Redis dies and
    Celery collects the connection (ignoring every error, as Celery does)."""
    conn.default_channel._brpop_start()
    broadcast = conn.channel()
    conn.Consumer(BROADCAST, channel=broadcast, callbacks=[lambda body, message: None]).consume()
    server.kill()
    with contextlib.suppress(Exception):
        conn.collect()


def test_a_channel_closed_after_its_connection_was_collected_restores_its_messages(
    redis_server: RedisServer,
) -> None:
    conn = _connection(redis_server.url)
    _deliver_one_unacked(conn)
    _lose_redis_while_waiting(conn, redis_server)
    redis_server.start()
    ignore_errors(conn, conn.close)  # raised AttributeError before the fix

    # The unacknowledged message is back in the queue at once (not after the
    # visibility timeout, an hour by default).
    again = _connection(redis_server.url)
    try:
        got: list[Any] = []
        again.Consumer(QUEUE, callbacks=[lambda body, message: got.append(body)]).consume()
        again.drain_events(timeout=5)
        assert got == [{"n": 1}]
    finally:
        again.release()


def test_a_close_while_redis_is_down_raises_only_a_connection_error(
    redis_server: RedisServer,
) -> None:
    """With Redis still down the messages cannot be put back now (the visibility
    timeout brings them back later); the close must not stop the consumer."""
    conn = _connection(redis_server.url)
    _deliver_one_unacked(conn)
    _lose_redis_while_waiting(conn, redis_server)
    ignore_errors(conn, conn.close)  # only connection errors may escape: none do

    redis_server.start()
    again = _connection(redis_server.url)
    try:
        channel = again.default_channel
        with channel.conn_or_acquire() as client:
            assert client.hlen(channel.unacked_key) == 1  # kept for the visibility timeout
    finally:
        again.release()
