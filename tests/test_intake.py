"""The intake (worker/intake.py) against a real Redis and the fake backend over real HTTP.

Each PENDING inference job is enqueued once, whatever the polls and intakes; every
page of ``GET jobs/`` is read; an invalid job is quarantined without its token and
written FAILED; while the backend fails, polling backs off.

The intake publishes through the process's Celery app (``worker.intake.app``); here
that name is pointed at an app configured as the worker's, on this test's own Redis
database, so nothing reaches another test's broker.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery

from config import load_settings
from config.settings import Settings, get_settings
from tests.conftest import wait_for
from tests.fake_backend import FakeBackend
from worker.app import create_app
from worker.backend_api import BackendAPI
from worker.intake import CLAIM_PREFIX, Intake
from worker.ledger import ENTRY_PREFIX, Ledger
from worker.message import INVALID_QUEUE, TASK_NAME
from worker.services import Services
from worker.settle import Settler

INTAKE_DB = 9  # a database of its own, emptied by each test
TOKEN = "tok-service-intake-0123456789"
SEALING_KEY = "0Xr2mTOPw3Uk9cCSGBkfsg6wVhS2xhPK1d-5PNMOTGo="
RELEASE = {"code": "image-classifier", "version": "1.0.0"}


@pytest.fixture
def db_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{INTAKE_DB}"


@pytest.fixture
def r(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    with FakeBackend(TOKEN) as backend:
        yield backend


@pytest.fixture(autouse=True)
def process_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's settings seal the tokens of the messages sent (``wire()``)."""
    monkeypatch.setenv("SYNAPSE_BRIDGE_SEALING_KEY", SEALING_KEY)
    monkeypatch.setenv("SYNAPSE_ACCESS_TOKEN", TOKEN)
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@dataclass
class World:
    settings: Settings
    app: Celery
    svc: Services
    fake: FakeBackend

    def intake(self) -> Intake:
        """A new intake, as another process would build one (its own backend client)."""
        return Intake(
            backend=BackendAPI(self.settings, base_url=self.fake.url),
            redis=self.svc.redis,
            settings=self.settings,
            token=TOKEN,
            ledger=Ledger(self.svc.redis, grace_s=60),
            settler=Settler(self.app, self.svc),
        )


@pytest.fixture
def world(
    db_url: str, r: redis.Redis, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., World]:
    made: list[Services] = []

    def make(broker_url: str | None = None, **overrides: Any) -> World:
        s = load_settings(
            redis_url=db_url,
            broker_url=broker_url or db_url,
            synapse_host=fake.url,
            access_token=TOKEN,
            sealing_key=SEALING_KEY,
            backend_timeout_s=5,
            **{"intake_page_size": 2, "intake_interval_s": 0.05, **overrides},
        )
        app = create_app(s)
        monkeypatch.setattr("worker.intake.app", app)
        svc = Services.build(s)
        made.append(svc)
        return World(s, app, svc, fake)

    yield make
    for svc in made:
        svc.close()


def add_pending(fake: FakeBackend, n: int, tenant: str = "acme") -> list[str]:
    ids = [f"job-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    for i, job_id in enumerate(ids):
        fake.add_job(
            job_id,
            status="PENDING",
            tenant=tenant,
            action="inference",
            params={"model": 12, "json": {"i": i}},
            plugin_release=RELEASE,
        )
    return ids


def broker_messages(r: redis.Redis, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Every message waiting on ``queue`` (all its priority lists): (raw, envelope)."""
    out = []
    for key in r.keys(f"{queue}*"):
        name = key.decode()
        if name != queue and not name.startswith(queue + ":"):
            continue  # inference.dlq, inference.invalid are queues of their own
        if r.type(key) == b"list":
            out += [(raw, json.loads(raw)) for raw in r.lrange(key, 0, -1)]
    return out


def kwargs_of(envelope: dict[str, Any]) -> dict[str, Any]:
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    _args, kwargs, _embed = json.loads(body)
    return kwargs


def enqueued_ids(r: redis.Redis) -> list[str]:
    return sorted(kwargs_of(e)["job"]["job_id"] for _, e in broker_messages(r, "inference"))


def list_polls(fake: FakeBackend) -> list[Any]:
    return [e for e in fake.entries("GET") if e.job_id is None]


# --- each PENDING job enqueued once


def test_each_pending_job_is_enqueued_once_across_polls_and_intakes(
    world: Callable[..., World], fake: FakeBackend, r: redis.Redis
) -> None:
    w = world()
    pending = add_pending(fake, 5)
    fake.add_job("job-running", status="RUNNING", action="inference")
    fake.add_job("job-done", status="SUCCEEDED", action="inference")
    first, second = w.intake(), w.intake()

    assert first.poll_once() == 5
    assert second.poll_once() == 0  # another intake: the claims hold
    assert first.poll_once() == 0  # the same one polling again
    assert enqueued_ids(r) == sorted(pending)

    for raw, envelope in broker_messages(r, "inference"):
        assert envelope["headers"]["task"] == TASK_NAME
        job = kwargs_of(envelope)["job"]
        assert job["token"].startswith("sealed:v1:")  # the service token, sealed
        assert TOKEN.encode() not in raw
        assert job["tenant"] == "acme" and job["model"] == 12 and job["release"] == RELEASE
    for job_id in pending:
        assert r.exists(CLAIM_PREFIX + job_id)
        assert r.exists(ENTRY_PREFIX + job_id)  # in the ledger before it was published
        assert 0 < r.ttl(CLAIM_PREFIX + job_id) <= w.settings.intake_claim_ttl_s
    assert all(fake.status(j) == "PENDING" for j in pending)  # the intake writes nothing


def test_concurrent_intakes_enqueue_each_job_once(
    world: Callable[..., World], fake: FakeBackend, r: redis.Redis
) -> None:
    w = world(intake_page_size=3)
    pending = add_pending(fake, 12)
    intakes = [w.intake() for _ in range(4)]
    barrier = threading.Barrier(len(intakes))
    counts: list[int] = []
    errors: list[BaseException] = []

    def poll(intake: Intake) -> None:
        try:
            barrier.wait(10)
            counts.append(intake.poll_once())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=poll, args=(i,)) for i in intakes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(counts) == 4
    assert sum(counts) == 12
    assert enqueued_ids(r) == sorted(pending)


def test_every_page_of_pending_jobs_is_read(
    world: Callable[..., World], fake: FakeBackend, r: redis.Redis
) -> None:
    w = world(intake_page_size=2)
    pending = add_pending(fake, 5)
    assert w.intake().poll_once() == 5
    assert enqueued_ids(r) == sorted(pending)
    paths = [e.path for e in list_polls(fake)]
    assert len(paths) == 3  # pages of 2, 2 and 1
    assert all("status=PENDING" in p and "action=inference" in p for p in paths)
    assert all("page_size=2" in p for p in paths)
    assert "page=2" in paths[1] and "page=3" in paths[2]


def test_a_job_claimed_but_not_pending_any_more_is_not_sent_again(
    world: Callable[..., World], fake: FakeBackend, r: redis.Redis
) -> None:
    w = world()
    [job_id] = add_pending(fake, 1)
    intake = w.intake()
    assert intake.poll_once() == 1
    r.delete(CLAIM_PREFIX + job_id)  # the claim expired...
    fake.jobs[job_id]["status"] = "RUNNING"  # ...but a worker took the job meanwhile
    assert intake.poll_once() == 0
    assert enqueued_ids(r) == [job_id]


# --- an invalid job


def test_an_invalid_job_is_quarantined_without_its_token_and_failed(
    world: Callable[..., World], fake: FakeBackend, r: redis.Redis
) -> None:
    w = world()
    good = add_pending(fake, 2)
    bad = "job-no-release"
    fake.add_job(
        bad, status="PENDING", action="inference", params={"model": 12, "json": {}}
    )  # no plugin_release: the message has no release to route to
    assert w.intake().poll_once() == 2
    assert enqueued_ids(r) == sorted(good)

    quarantined = broker_messages(r, INVALID_QUEUE)
    assert len(quarantined) == 1
    raw, envelope = quarantined[0]
    kwargs = kwargs_of(envelope)
    assert kwargs["job"]["job_id"] == bad
    assert kwargs["job"]["token"] == "[redacted]"
    assert "release" in kwargs["error"]
    assert TOKEN.encode() not in raw and b"sealed:v1:" not in raw
    body = base64.b64decode(envelope["body"]) if isinstance(envelope["body"], str) else b""
    assert TOKEN.encode() not in body

    assert fake.status(bad) == "FAILED"
    [write] = fake.applied(bad)
    assert "release" in write.body["result"]["error"]
    assert write.tenant == "acme"
    assert all(fake.status(j) == "PENDING" for j in good)
    # Claimed: the next poll neither quarantines nor fails it again.
    fake.jobs[bad]["status"] = "PENDING"
    assert w.intake().poll_once() == 0
    assert len(broker_messages(r, INVALID_QUEUE)) == 1


# --- run_forever: backs off while the backend fails


def run_in_thread(intake: Intake, stop: threading.Event) -> tuple[threading.Thread, list]:
    died: list[BaseException] = []

    def target() -> None:
        try:
            intake.run_forever(stop)
        except BaseException as e:  # the test reads it
            died.append(e)

    thread = threading.Thread(target=target, name="intake-under-test", daemon=True)
    thread.start()
    return thread, died


def test_run_forever_backs_off_while_the_backend_fails_then_polls_at_the_interval(
    world: Callable[..., World], fake: FakeBackend, r: redis.Redis
) -> None:
    interval, failures = 0.05, 6
    w = world(intake_interval_s=interval)
    fake.script("GET", n=failures, code=503)
    stop = threading.Event()
    thread, died = run_in_thread(w.intake(), stop)
    try:
        wait_for(
            lambda: len(list_polls(fake)) >= failures + 4 or died,
            timeout=30,
            what="six failed polls, then four good ones",
        )
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "run_forever did not stop when asked"
    assert not died, died
    polls = list_polls(fake)
    assert [p.code for p in polls[: failures + 1]] == [503] * failures + [200]
    gaps = [b.started - a.started for a, b in itertools.pairwise(polls)]
    # After the k-th failure in a row: a delay in [ceiling/2, ceiling], ceiling doubling.
    for k in range(failures):
        ceiling = interval * 2**k
        assert ceiling / 2 - 0.005 <= gaps[k] <= ceiling + 1.5, (k, gaps[k])
    assert gaps[failures - 1] >= 0.8 - 0.005  # the last backoff: over 16 intervals
    # Back to the regular interval once a poll succeeds (no backoff carried over).
    assert all(g < 0.6 for g in gaps[failures : failures + 3]), gaps[failures:]


def test_run_forever_stops_at_once_in_the_middle_of_a_backoff(
    world: Callable[..., World], fake: FakeBackend
) -> None:
    w = world(intake_interval_s=30)  # the first backoff: 15 to 30 s
    fake.script("GET", n=5, code=503)
    stop = threading.Event()
    thread, died = run_in_thread(w.intake(), stop)
    wait_for(lambda: list_polls(fake), timeout=10, what="the first poll")
    wait_for(lambda: list_polls(fake)[0].ended, timeout=10, what="its answer")
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "run_forever sleeps through a stop"
    assert not died and len(list_polls(fake)) == 1


def test_run_forever_keeps_polling_while_the_broker_is_down(
    world: Callable[..., World], fake: FakeBackend, r: redis.Redis
) -> None:
    """A broker outage is an outage like the backend's: the loop backs off, it does not
    end. (Redis for claims and the ledger is up; only the broker is not.)"""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_broker = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    w = world(broker_url=dead_broker, intake_interval_s=0.05)
    w.app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}  # fail fast
    add_pending(fake, 1)
    stop = threading.Event()
    thread, died = run_in_thread(w.intake(), stop)
    try:
        wait_for(
            lambda: len(list_polls(fake)) >= 3 or died,
            timeout=60,
            what="three polls, or the loop ending",
        )
    finally:
        stop.set()
        thread.join(10)
    if died:
        raise died[0]
    assert len(list_polls(fake)) >= 3
