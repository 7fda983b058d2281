"""The submission ledger and the broker's queue depth, against a real Redis (and RabbitMQ).

The loss the ledger exists for: kombu's Redis transport pops a message (BRPOP) before it
records it as unacked, so a worker killed in between leaves no trace of it on the broker.
The tests make that loss by popping the message off the broker's list with Redis, as a
BRPOP whose worker died does, and check that a sweep publishes the job again.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from cryptography.fernet import Fernet
from kombu import Connection, Exchange, Queue

from tests.conftest import wait_for
from tests.test_worker import RABBIT_URL, _rabbit_reachable
from worker.broker import queued
from worker.ledger import DUE, ENTRY_PREFIX, LEGACY, TTL_GRACES, Ledger
from worker.message import QUEUE, TASK_NAME, JobMessage, parse_job
from worker.submit import send_message

GRACE = 0.3  # seconds: the ledger's grace in these tests
LEDGER_DB = 13  # a database of its own, emptied by each test
# The lists kombu keeps for QUEUE, one per priority step (priority_steps 0..9, sep ":").
QUEUE_KEYS = [QUEUE, *(f"{QUEUE}:{p}" for p in range(1, 10))]


@pytest.fixture
def db_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{LEDGER_DB}"


@pytest.fixture(autouse=True)
def sealing_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Jobs' wire form seals the token: give this module a key of its own."""
    from config import get_settings

    monkeypatch.setenv("SYNAPSE_BRIDGE_SEALING_KEY", Fernet.generate_key().decode())
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def r(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def app(db_url: str, r: redis.Redis) -> Celery:
    """A Celery app configured as the worker's, on the test Redis (broker and backend)."""
    from config import load_settings
    from worker.app import create_app

    return create_app(load_settings(broker_url=db_url, redis_url=db_url))


def _job(priority: int = 5) -> JobMessage:
    return parse_job(
        {
            "job_id": f"job-{uuid.uuid4().hex[:12]}",
            "tenant": "acme",
            "token": "tok-ledger-0123456789",
            "model": 12,
            "json": {"inputs": [1, 2, 3]},
            "release": {"code": "image-classifier", "version": "1.0.0"},
            "priority": priority,
        }
    )


def _lose(r: redis.Redis) -> dict[str, Any]:
    """Pop one message off the queue's lists, as a worker killed right after BRPOP."""
    popped = r.brpop(QUEUE_KEYS, timeout=5)
    assert popped is not None, "no message on the broker to lose"
    return json.loads(popped[1])


def _job_id(payload: dict[str, Any]) -> str:
    """The job id in a kombu/Celery (protocol 2) message as it lies on a Redis list."""
    body = payload["body"]
    if payload["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    _args, kwargs, _embed = json.loads(body)
    return str(kwargs["job"]["job_id"])


def _resender(app: Celery, ledger: Ledger) -> Callable[[dict[str, Any]], None]:
    """What the worker's housekeeping passes as ``resend``."""

    def resend(wire: dict[str, Any]) -> None:
        send_message(parse_job(wire), app=app, ledger=ledger)

    return resend


def _overdue(r: redis.Redis, job_id: str) -> bool:
    return r.zscore(DUE, job_id) is not None and float(r.zscore(DUE, job_id)) <= time.time()


# --- (1) the loss itself: popped, never recorded as unacked -> published again


def test_message_lost_between_pop_and_unacked_record_is_published_again(
    app: Celery, r: redis.Redis
) -> None:
    ledger = Ledger(r, grace_s=GRACE)
    job = _job()
    send_message(job, app=app, ledger=ledger)
    assert queued(app, QUEUE) == 1

    lost = _lose(r)
    assert _job_id(lost) == job.job_id
    assert queued(app, QUEUE) == 0  # the broker has no trace of it
    assert r.exists(ENTRY_PREFIX + job.job_id)

    resend = _resender(app, ledger)
    resent = wait_for(
        lambda: ledger.sweep(lambda: queued(app, QUEUE), resend, lambda _id: False),
        timeout=10,
        interval=0.05,
        what="the sweep to republish the lost job once its grace passed",
    )
    assert resent == 1
    assert queued(app, QUEUE) == 1
    again = _lose(r)
    assert _job_id(again) == job.job_id
    # Published again means recorded again: covered if this copy is lost too.
    assert r.exists(ENTRY_PREFIX + job.job_id)
    assert float(r.zscore(DUE, job.job_id)) > time.time()


# --- (2) messages waiting: a loss is not provable, nothing is republished


def test_nothing_is_republished_while_messages_wait(app: Celery, r: redis.Redis) -> None:
    ledger = Ledger(r, grace_s=GRACE)
    lost, waiting = _job(), _job()
    send_message(lost, app=app, ledger=ledger)
    assert _job_id(_lose(r)) == lost.job_id
    send_message(waiting, app=app, ledger=ledger)
    wait_for(lambda: _overdue(r, lost.job_id), timeout=10, what="the lost job's entry overdue")

    asked: list[int | None] = []

    def depth() -> int | None:
        asked.append(queued(app, QUEUE))
        return asked[-1]

    resent: list[dict[str, Any]] = []
    assert ledger.sweep(depth, resent.append, lambda _id: False) == 0
    assert asked == [1]  # the sweep asked the broker, and one message waits
    assert resent == []
    assert queued(app, QUEUE) == 1
    # "Cannot tell" is no better than "not empty".
    assert ledger.sweep(lambda: None, resent.append, lambda _id: False) == 0
    assert resent == []
    assert r.exists(ENTRY_PREFIX + lost.job_id)


# --- (3) a job already final is dropped, not resent


def test_entry_of_a_final_job_is_dropped_not_resent(app: Celery, r: redis.Redis) -> None:
    ledger = Ledger(r, grace_s=GRACE)
    job = _job()
    send_message(job, app=app, ledger=ledger)
    _lose(r)
    wait_for(lambda: _overdue(r, job.job_id), timeout=10, what="the entry overdue")

    resent: list[dict[str, Any]] = []
    asked_final: list[str] = []

    def is_final(job_id: str) -> bool:
        asked_final.append(job_id)
        return True

    assert ledger.sweep(lambda: queued(app, QUEUE), resent.append, is_final) == 0
    assert asked_final == [job.job_id]
    assert resent == []
    assert queued(app, QUEUE) == 0
    assert not r.exists(ENTRY_PREFIX + job.job_id)
    assert r.zscore(DUE, job.job_id) is None


# --- (4) entries expire; the due set keeps no orphans


def test_entries_expire_and_the_due_set_keeps_no_orphans(r: redis.Redis) -> None:
    assert Ledger(r, grace_s=3600).ttl_s == TTL_GRACES * 3600
    with pytest.raises(ValueError):
        Ledger(r, grace_s=10, ttl_s=10)

    ledger = Ledger(r, grace_s=GRACE, ttl_s=1.0)
    wire = _job().wire()
    ledger.record("expiring", wire)
    assert json.loads(r.get(ENTRY_PREFIX + "expiring")) == wire  # stored as given
    assert 0 < r.ttl(ENTRY_PREFIX + "expiring") <= 1
    ledger.record("delayed", wire, after_s=60)
    assert 60 < r.ttl(ENTRY_PREFIX + "delayed") <= 61
    assert float(r.zscore(DUE, "delayed")) > time.time() + 60

    wait_for(lambda: not r.exists(ENTRY_PREFIX + "expiring"), timeout=10, what="entry expiry")
    resent: list[dict[str, Any]] = []
    # Pruned by any sweep, even one that resends nothing (messages wait).
    assert ledger.sweep(lambda: 7, resent.append, lambda _id: False) == 0
    assert r.zscore(DUE, "expiring") is None
    assert r.zscore(DUE, "delayed") is not None  # alive, not due: kept

    # An entry gone before its due time ran out (deleted here) is dropped when claimed.
    ledger = Ledger(r, grace_s=GRACE)
    ledger.record("vanished", wire)
    r.delete(ENTRY_PREFIX + "vanished")
    wait_for(lambda: _overdue(r, "vanished"), timeout=10, what="the entry overdue")
    assert ledger.sweep(lambda: 0, resent.append, lambda _id: False) == 0
    assert resent == []
    assert r.zscore(DUE, "vanished") is None

    # started() removes both the entry and its due time.
    ledger.record("started", wire)
    ledger.started("started")
    assert not r.exists(ENTRY_PREFIX + "started")
    assert r.zscore(DUE, "started") is None

    # Every key the ledger leaves has a TTL, the due set aside.
    for key in r.scan_iter(ENTRY_PREFIX + "*"):
        assert r.ttl(key) > 0, key


def test_legacy_hash_becomes_entries_with_ttl(r: redis.Redis) -> None:
    """The ledger of an earlier version (one hash, no TTL) does not stay forever."""
    wire = _job().wire()
    r.hset(LEGACY, "old", json.dumps(wire))
    r.zadd(DUE, {"old": time.time() + 3600})
    ledger = Ledger(r, grace_s=GRACE, ttl_s=30)
    assert ledger.sweep(lambda: 0, lambda _w: None, lambda _id: False) == 0
    assert not r.exists(LEGACY)
    assert json.loads(r.get(ENTRY_PREFIX + "old")) == wire
    assert 0 < r.ttl(ENTRY_PREFIX + "old") <= 30


# --- (5) queued(): the broker's own count


def test_queued_on_redis_counts_every_priority_level(app: Celery, r: redis.Redis) -> None:
    assert queued(app, QUEUE) == 0  # never declared: no list
    for priority in (0, 3, 5, 9, 9):
        app.send_task(TASK_NAME, kwargs={"job": {}}, priority=priority, queue=QUEUE)
    levels = {key: r.llen(key) for key in QUEUE_KEYS if r.llen(key)}
    assert len(levels) == 4, levels  # several priority lists, not one
    assert queued(app, QUEUE) == 5

    for key in QUEUE_KEYS:  # as consumers do: pop until the lists are empty
        while r.rpop(key) is not None:
            pass
    assert not any(r.exists(k) for k in QUEUE_KEYS)  # Redis deleted the empty lists
    assert queued(app, QUEUE) == 0
    # What the old check relied on: a passive declare raises for this empty queue.
    with app.connection_for_write() as conn, pytest.raises(Exception, match="NOT_FOUND"):
        conn.default_channel.queue_declare(QUEUE, passive=True)


def test_queued_cannot_tell_on_other_transports_or_a_dead_broker() -> None:
    assert queued(Celery(broker="memory://"), QUEUE) is None
    dead = Celery(broker="redis://127.0.0.1:1/0")
    dead.conf.broker_connection_timeout = 0.5
    dead.conf.broker_transport_options = {"max_retries": 1}
    assert queued(dead, QUEUE) is None


@pytest.mark.slow
def test_queued_on_amqp_counts_ready_messages_and_a_missing_queue_is_unknown() -> None:
    """As the RabbitMQ scenarios of test_worker/test_faults: the RabbitMQ at RABBIT_URL."""
    if not _rabbit_reachable():
        pytest.skip(f"no RabbitMQ at {RABBIT_URL} (set SYNAPSE_TEST_AMQP_URL)")
    name = f"ledger-test-{uuid.uuid4().hex[:8]}"  # not the shared server's job queue
    app = Celery(broker=RABBIT_URL)
    assert queued(app, name) is None  # missing on AMQP: an error, not 0

    queue = Queue(
        name,
        Exchange(name, type="direct"),
        routing_key=name,
        queue_arguments={"x-max-priority": 10},
    )
    with Connection(RABBIT_URL) as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        try:
            assert queued(app, name) == 0
            producer = conn.Producer(serializer="json")
            for priority in (0, 4, 9):
                producer.publish(
                    {"n": priority},
                    exchange=queue.exchange,
                    routing_key=name,
                    priority=priority,
                    declare=[queue],
                )
            wait_for(lambda: queued(app, name) == 3, timeout=15, what="3 messages counted")
            message = bound.get(no_ack=False)
            assert message is not None
            # Taken but not acked: no longer waiting.
            wait_for(lambda: queued(app, name) == 2, timeout=15, what="2 messages waiting")
            message.ack()
        finally:
            bound.delete()
