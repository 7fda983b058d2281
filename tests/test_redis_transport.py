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
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.common import ignore_errors

from devtools.redis_server import RedisServer
from worker import redis_transport
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


# --- taking a backlog in batches

APP_OPTIONS = {
    "visibility_timeout": 3600,
    "queue_order_strategy": "priority",
    "priority_steps": list(range(10)),
    "sep": ":",
}


def _app_connection(url: str, **options: Any) -> Connection:
    """As the worker's app connects (``worker.app``): priority lists, ``:`` separator."""
    return Connection(url, transport=TRANSPORT, transport_options={**APP_OPTIONS, **options})


def _publish(conn: Connection, bodies: list[dict[str, Any]]) -> None:
    producer = conn.Producer()
    for body in bodies:
        producer.publish(
            body,
            exchange=QUEUE.exchange,
            routing_key="transport-test",
            declare=[QUEUE],
            priority=body.get("priority", 5),
        )


def _brpops(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_brpop", {}).get("calls", 0))


def _take_all(
    url: str, n: int, prefetch: int, r: redis.Redis
) -> tuple[list[dict[str, Any]], list[str]]:
    """Consume ``n`` messages, prefetch ``prefetch``, acking each; say what came, and
    what was wrong with a message's unacked record when its callback ran."""
    conn = _app_connection(url)
    got: list[dict[str, Any]] = []
    wrong: list[str] = []

    def on_message(body: Any, message: Any) -> None:
        record = r.hget("unacked", message.delivery_tag)
        expected = [message._raw, message.delivery_info["exchange"], "transport-test"]
        if record is None or json.loads(record) != expected:
            wrong.append(f"{body}: {record!r}")
        got.append(body)

    try:
        consumer = conn.Consumer(QUEUE, callbacks=[on_message])
        consumer.qos(prefetch_count=prefetch)
        consumer.consume()
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            conn.drain_events(timeout=5)
            for tag in list(conn.default_channel.qos._delivered):
                conn.default_channel.basic_ack(tag)
    finally:
        conn.release()
    return got, wrong


def test_a_backlog_is_taken_in_batches_in_kombus_order_each_recorded_before_delivery(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    bodies = [{"n": i, "priority": (i * 7) % 10} for i in range(60)]

    # kombu's order, one message per BRPOP (no batch): what a batch must not change
    monkeypatch.setattr(redis_transport, "MAX_BATCH", 0)
    _publish(_app_connection(redis_server.url), bodies)
    r.config_resetstat()
    one_by_one, wrong = _take_all(redis_server.url, 60, prefetch=16, r=r)
    assert wrong == []
    assert _brpops(r) >= 60

    monkeypatch.setattr(redis_transport, "MAX_BATCH", 100)
    _publish(_app_connection(redis_server.url), bodies)
    r.config_resetstat()
    batched, wrong = _take_all(redis_server.url, 60, prefetch=16, r=r)
    assert wrong == []  # each recorded as kombu records it, before its callback ran
    assert batched == one_by_one
    assert sorted(b["n"] for b in batched) == list(range(60))  # each once
    assert _brpops(r) <= 60 // 16 + 2
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0  # all acked


def test_a_batch_holds_no_more_than_the_prefetch_allows(redis_server: RedisServer) -> None:
    conn = _app_connection(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    _publish(conn, [{"n": i} for i in range(30)])
    got: list[Any] = []
    try:
        consumer = conn.Consumer(QUEUE, callbacks=[lambda body, message: got.append(body)])
        consumer.qos(prefetch_count=8)
        consumer.consume()
        conn.drain_events(timeout=5)
        assert len(got) == 8
        assert r.hlen("unacked") == 8
        assert sum(r.llen(k) for k in r.scan_iter("transport-test*")) == 22
    finally:
        conn.release()  # unacked, so put back at close
    assert sum(r.llen(k) for k in r.scan_iter("transport-test*")) == 30
    assert r.hlen("unacked") == 0


def test_an_unreadable_message_ends_the_batch_and_stays_where_it_was(
    redis_server: RedisServer,
) -> None:
    conn = _app_connection(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    _publish(conn, [{"n": 0, "priority": 0}, {"n": 1, "priority": 0}])
    r.lpush("transport-test", b"not json")
    r.lpush("transport-test", json.dumps({"body": "no properties"}))
    _publish(conn, [{"n": 2, "priority": 0}])
    got: list[Any] = []
    try:
        consumer = conn.Consumer(QUEUE, callbacks=[lambda body, message: got.append(body)])
        consumer.qos(prefetch_count=10)
        consumer.consume()
        conn.drain_events(timeout=5)
        assert [b["n"] for b in got] == [0, 1]
        assert r.hlen("unacked") == 2
        # next to pop: the unreadable one, then the one without properties, then n=2
        assert r.lrange("transport-test", 0, -1)[::-1][:2] == [
            b"not json",
            json.dumps({"body": "no properties"}).encode(),
        ]
        assert r.llen("transport-test") == 3
    finally:
        conn.release()


def test_a_consumer_that_does_not_ack_leaves_no_record(redis_server: RedisServer) -> None:
    conn = _app_connection(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    _publish(conn, [{"n": i} for i in range(5)])
    got: list[Any] = []
    try:
        consumer = conn.Consumer(
            QUEUE, callbacks=[lambda body, message: got.append(body)], no_ack=True
        )
        consumer.consume()
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            conn.drain_events(timeout=5)
    finally:
        conn.release()
    assert sorted(b["n"] for b in got) == list(range(5))
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0


def test_a_batch_taken_by_a_consumer_that_dies_comes_back_after_the_visibility_timeout(
    redis_server: RedisServer,
) -> None:
    """No close, no ack: as a worker killed with SIGKILL mid-batch."""
    r = redis.Redis.from_url(redis_server.url)
    dying = _app_connection(redis_server.url, visibility_timeout=1)
    _publish(dying, [{"n": i} for i in range(20)])
    got: list[Any] = []
    consumer = dying.Consumer(QUEUE, callbacks=[lambda body, message: got.append(body)])
    consumer.qos(prefetch_count=12)
    consumer.consume()
    dying.drain_events(timeout=5)
    assert len(got) == 12 and r.hlen("unacked") == 12
    # the dying connection is abandoned, never closed

    survivor = _app_connection(redis_server.url, visibility_timeout=1)
    try:
        deadline = time.monotonic() + 15
        while r.hlen("unacked") and time.monotonic() < deadline:
            survivor.default_channel.qos.restore_visible(num=100, interval=0)
            time.sleep(0.2)
        assert sum(r.llen(k) for k in r.scan_iter("transport-test*")) == 20
    finally:
        survivor.release()


def test_acks_from_many_threads_remove_each_record_and_only_its_own(
    redis_server: RedisServer,
) -> None:
    conn = _app_connection(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    _publish(conn, [{"n": i} for i in range(64)])
    messages: list[Any] = []
    try:
        consumer = conn.Consumer(QUEUE, callbacks=[lambda body, message: messages.append(message)])
        consumer.qos(prefetch_count=64)
        consumer.consume()
        deadline = time.monotonic() + 10
        while len(messages) < 64 and time.monotonic() < deadline:
            conn.drain_events(timeout=5)
        assert r.hlen("unacked") == 64
        acked, kept = messages[:48], messages[48:]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda m: m.ack(), acked))
        assert {t.decode() for t in r.hkeys("unacked")} == {m.delivery_tag for m in kept}
        assert r.zcard("unacked_index") == 16
    finally:
        conn.release()
    assert sum(r.llen(k) for k in r.scan_iter("transport-test*")) == 16  # the rest put back
