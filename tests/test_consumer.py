"""The quarantining consumer (worker/consumer.py) in a real Celery worker on real Redis.

An embedded worker (Celery's test worker, thread pool) runs ``QuarantiningConsumer``
with the bridge's app configuration. Invalid messages carrying a user token go to
``inference.invalid`` with the token redacted, and their job is failed through a
``synapse.inference.fail_invalid`` task message, never a backend call on the consumer
thread: the backend here is a socket that accepts nothing, and quarantine stays fast.
"""

from __future__ import annotations

import ast
import base64
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import ROOT, TOKENS, wait_for

CONSUMER_DB = 12  # a database of its own, emptied by each test
USER_TOKEN = TOKENS["alice"]
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJtb2RlbCI6IjEyIiwidG9rZW4iOiJ4In0.c2lnbmF0dXJlX2hlcmU"


@pytest.fixture
def db_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{CONSUMER_DB}"


@pytest.fixture
def r(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def dead_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A backend that never answers: a listening socket nobody accepts on. Any
    connection attempt would sit in its backlog, where the test looks for it."""
    from config.settings import get_settings

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for name in ("SYNAPSE_HOST", "SYNAPSE_PLUGIN_RUN_HOST"):
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("SYNAPSE_ACCESS_TOKEN", TOKENS["service"])
    monkeypatch.setenv("SYNAPSE_BRIDGE_BACKEND_TIMEOUT", "20")
    get_settings.cache_clear()
    yield sock
    sock.close()
    get_settings.cache_clear()


def connections_to(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


@pytest.fixture
def worker(db_url: str, r: redis.Redis, dead_backend: socket.socket) -> Iterator[dict[str, Any]]:
    """The bridge's Celery configuration in an embedded worker; its only task records
    the fail_invalid messages it runs (the lead's task writes FAILED instead)."""
    from celery.contrib.testing.worker import start_worker

    from config import load_settings
    from worker.app import create_app
    from worker.message import FAIL_INVALID_TASK_NAME, QUEUE
    from worker.request import SafeTask

    app = create_app(load_settings(broker_url=db_url, redis_url=db_url))
    app.conf.imports = []  # no worker.tasks / worker.lifecycle: the consumer alone
    app.conf.worker_send_task_events = False
    ran: list[dict[str, Any]] = []

    @app.task(name=FAIL_INVALID_TASK_NAME, shared=False)
    def fail_invalid(*, job_id: str, error: str, tenant: str | None = None) -> None:
        ran.append(
            {
                "job_id": job_id,
                "error": error,
                "tenant": tenant,
                "thread": threading.current_thread().name,
            }
        )

    release = threading.Event()

    @app.task(name="test.consumer.block", shared=False, base=SafeTask)
    def block(*, job: Any = None, **_: Any) -> None:
        release.wait(30)

    # Consuming ``inference`` only, as ``synapse-bridge worker`` does (-Q inference).
    app.conf.task_queues = [q for q in app.conf.task_queues if q.name == QUEUE]
    with start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=20
    ) as w:
        assert type(w.consumer).__name__ == "QuarantiningConsumer"
        try:
            yield {"app": app, "ran": ran, "worker": w, "release": release}
        finally:
            release.set()


def invalid_entries(r: redis.Redis) -> list[dict[str, Any]]:
    out = []
    for key in r.keys("inference.invalid*"):
        if r.type(key) == b"list":
            out += [json.loads(m) for m in r.lrange(key, 0, -1)]
    return out


def body_of(envelope: dict[str, Any]) -> bytes:
    body = envelope.get("body") or ""
    if (envelope.get("properties") or {}).get("body_encoding") == "base64":
        return base64.b64decode(body)
    return body.encode()


def publish(app: Any, body: bytes, headers: dict[str, Any], **kw: Any) -> None:
    from worker.message import QUEUE

    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            routing_key=QUEUE,
            exchange=QUEUE,
            headers=headers,
            content_type=kw.get("content_type", "application/json"),
            content_encoding=kw.get("content_encoding", "utf-8"),
        )


def task_headers(task: str, tag: str, **extra: Any) -> dict[str, Any]:
    return {"task": task, "id": tag, "lang": "py", "argsrepr": "()", **extra}


def a_job(job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "tenant": "acme",
        "token": USER_TOKEN,
        "model": 12,
        "json": {"inputs": [[1.0]], "note": f"Bearer {JWT}"},
        "release": {"code": "example-classifier", "version": "1.0.0"},
    }


def quarantined(r: redis.Redis, tag: str, timeout: float = 10) -> dict[str, Any]:
    def mine() -> list[dict[str, Any]]:
        return [e for e in invalid_entries(r) if (e.get("headers") or {}).get("id") == tag]

    found = wait_for(mine, timeout=timeout, what=f"message {tag} quarantined")
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- tests


def test_invalid_message_is_quarantined_redacted_and_its_job_failed_by_a_task(
    worker: dict[str, Any], r: redis.Redis, dead_backend: socket.socket
) -> None:
    """An unknown task carrying a job (and an outside producer's kwargsrepr showing the
    token): quarantined without the token, a fail_invalid task run, no backend call."""
    from worker.consumer import REASON_HEADER

    app, ran = worker["app"], worker["ran"]
    job_id = f"cons-{uuid.uuid4().hex[:10]}"
    kwargs = {"job": a_job(job_id)}
    tag = uuid.uuid4().hex
    started = time.monotonic()
    publish(
        app,
        json.dumps([[], kwargs, {}]).encode(),
        task_headers("synapse.inference.not_a_task", tag, kwargsrepr=repr(kwargs)),
    )
    entry = quarantined(r, tag)
    took = time.monotonic() - started
    assert took < 5, f"quarantine took {took:.1f}s with the backend unreachable"

    raw = json.dumps(entry)
    body = body_of(entry)
    assert USER_TOKEN not in raw and USER_TOKEN.encode() not in body
    assert JWT not in raw and JWT.encode() not in body
    headers = entry["headers"]
    assert "unknown task" in headers[REASON_HEADER]
    assert headers["task"] == "synapse.inference.not_a_task"  # the envelope is kept
    assert headers["kwargsrepr"] == "[redacted]"  # it quoted the token
    args, kw, embed = json.loads(body)
    assert args == [] and embed == {}
    assert kw["job"]["token"] == "[redacted]"
    assert kw["job"]["job_id"] == job_id and kw["job"]["json"]["inputs"] == [[1.0]]

    done = wait_for(lambda: [x for x in ran if x["job_id"] == job_id], timeout=10)
    assert done[0]["tenant"] == "acme" and "unknown task" in done[0]["error"]
    assert connections_to(dead_backend) == 0, "the consumer called the backend"


def test_a_burst_of_invalid_messages_never_waits_on_the_backend(
    worker: dict[str, Any], r: redis.Redis, dead_backend: socket.socket
) -> None:
    """A12: ten malformed bodies with job ids (the backend down) all quarantined within
    seconds; each job's failure is a task message."""
    app, ran = worker["app"], worker["ran"]
    tags, ids = [], []
    started = time.monotonic()
    for _ in range(10):
        job_id = f"burst-{uuid.uuid4().hex[:10]}"
        tag = uuid.uuid4().hex
        # [args, kwargs] with no embed: not a task body (worker/consumer.py checks it).
        body = json.dumps([[], {"job": a_job(job_id)}]).encode()
        publish(app, body, task_headers("synapse.inference.run", tag))
        tags.append(tag)
        ids.append(job_id)
    wait_for(
        lambda: (
            len({(e.get("headers") or {}).get("id") for e in invalid_entries(r)} & set(tags))
            == len(tags)
        ),
        timeout=10,
        what="the burst quarantined",
    )
    assert time.monotonic() - started < 8
    assert USER_TOKEN not in json.dumps(invalid_entries(r))
    wait_for(lambda: {x["job_id"] for x in ran} >= set(ids), timeout=10, what="fail tasks run")
    assert connections_to(dead_backend) == 0


def test_an_undecodable_body_is_kept_as_it_came(worker: dict[str, Any], r: redis.Redis) -> None:
    """Broken JSON cannot be searched for a token: kept byte for byte (module docstring)."""
    app = worker["app"]
    tag = uuid.uuid4().hex
    body = b'[[], {"job": {"job_id": "broken", "token": "' + USER_TOKEN.encode() + b'"'
    publish(app, body, task_headers("synapse.inference.run", tag))
    entry = quarantined(r, tag)
    assert body_of(entry) == body
    assert "undecodable" in entry["headers"]["x-synapse-invalid-reason"]
    assert worker["ran"] == []  # no job id could be read


def test_a_valid_envelope_with_no_job_id_publishes_no_fail_task(
    worker: dict[str, Any], r: redis.Redis
) -> None:
    app = worker["app"]
    tag = uuid.uuid4().hex
    kwargs = {"job": {"token": USER_TOKEN, "model": 12}}
    publish(app, json.dumps([[], kwargs, {}]).encode(), task_headers("nope.task", tag))
    entry = quarantined(r, tag)
    assert USER_TOKEN not in json.dumps(entry) and USER_TOKEN.encode() not in body_of(entry)
    time.sleep(0.5)
    assert worker["ran"] == []


def test_inspect_never_shows_a_token(worker: dict[str, Any], r: redis.Redis) -> None:
    """inspect active/reserved/scheduled/query_task (what Flower shows) on tasks sent as
    an outside producer sends them: Celery's default kwargsrepr quotes the token."""
    app = worker["app"]
    ids = {}
    for name, countdown in [("later", 60), ("a", None), ("b", None), ("c", None)]:
        job_id = f"insp-{name}-{uuid.uuid4().hex[:8]}"
        res = app.send_task(
            "test.consumer.block", kwargs={"job": a_job(job_id)}, countdown=countdown
        )
        ids[res.id] = job_id
    inspect = app.control.inspect(timeout=2)

    def active() -> list[Any]:
        return [t for ts in (inspect.active() or {}).values() for t in ts]

    def scheduled() -> list[Any]:
        return [t for ts in (inspect.scheduled() or {}).values() for t in ts]

    wait_for(lambda: len(active()) >= 2, timeout=20, what="two tasks active")
    wait_for(lambda: scheduled(), timeout=20, what="the countdown task scheduled")
    answers = {
        "active": inspect.active(),
        "active(safe=False)": inspect.active(safe=False),
        "reserved": inspect.reserved(),
        "scheduled": inspect.scheduled(),
        "query_task": inspect.query_task(*ids),
    }
    text = json.dumps(answers, default=str)
    assert USER_TOKEN not in text and JWT not in text, text[:2000]
    shown = [t for ts in answers["active"].values() for t in ts]
    assert all(t["kwargs"].startswith("{'job': {'job_id': 'insp-") for t in shown), shown
    assert any(ids[t["id"]] in t["kwargs"] for t in shown)
    later = [t["request"] for ts in answers["scheduled"].values() for t in ts]
    assert later and "insp-later-" in later[0]["kwargs"]
    queried = [v for ts in answers["query_task"].values() for v in ts.values()]
    assert len(queried) >= 3 and all("insp-" in info["kwargs"] for _, info in queried)
    worker["release"].set()


def test_the_consumer_module_never_imports_worker_tasks() -> None:
    """Statically (no import of worker.tasks anywhere in the module), and at run time."""
    tree = ast.parse((ROOT / "worker" / "consumer.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module != "worker.tasks", f"line {node.lineno}"
            assert not (node.module == "worker" and any(a.name == "tasks" for a in node.names))
        if isinstance(node, ast.Import):
            assert all(a.name != "worker.tasks" for a in node.names), f"line {node.lineno}"
    code = "import sys, worker.consumer; assert 'worker.tasks' not in sys.modules"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_module_docstring_says_undecodable_bodies_are_kept() -> None:
    import worker.consumer

    doc = worker.consumer.__doc__ or ""
    assert "does not decode" in doc and "kept" in doc
