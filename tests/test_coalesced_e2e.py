"""Coalesced calls end to end: many jobs' items in one request to real Ray Serve.

The runtime answers each item as a single call would, runs the items as one device
batch, and keeps one item's error to itself; the worker groups queued jobs of one
model and caller, and every job is still written once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.redis_server import RedisServer
from local_backend.server import free_port
from serve_runtime import Pending, ServeClientError, ServeServerError
from serve_runtime.coalesced import ITEMS_HEADER
from tests.conftest import TOKENS, WorkerProcess, wait_for
from tests.fault_kit import (
    EXPECTED,
    FAULT_WORKER_ENV,
    RELEASE,
    ROWS,
    Job,
    Producer,
    coalesced_calls,
    count,
    make_jobs,
    wait_all_final,
)
from tests.test_serve_e2e import client, stats

KW = {"model": 12, "tenant": "acme"}


def alice(n: int) -> dict[str, Any]:
    return {**KW, "tokens": [TOKENS["alice"]] * n}


def batch_sizes(app: Any) -> dict[int, int]:
    return {int(k): v for k, v in stats(app.app_name)["batch_sizes"].items()}


def grown(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_each_item_is_answered_as_its_own_call_would_be_in_one_device_batch(
    example_app: Any,
) -> None:
    c = client()
    rows = [ROWS[i % 3] for i in range(20)]
    singles = [
        c.infer(example_app.route_prefix, {"inputs": [r]}, token=TOKENS["alice"], **KW)
        for r in rows[:3]
    ]
    before = batch_sizes(example_app)
    answers = c.infer_many(example_app.route_prefix, [{"inputs": [r]} for r in rows], **alice(20))
    assert [a["predictions"] for a in answers] == [[EXPECTED[i % 3]] for i in range(20)]
    assert answers[:3] == singles
    assert grown(before, batch_sizes(example_app)) == {20: 1}  # 20 items, one device call


def test_a_bad_item_gets_its_own_error_and_the_others_their_results(example_app: Any) -> None:
    c = client()
    bodies: list[Any] = [{"inputs": [ROWS[0]]}, {"inputs": "not rows"}, {"inputs": [ROWS[1]]}]
    bodies.append(["not", "an", "object"])  # refused by the endpoint's own validation
    answers = c.infer_many(example_app.route_prefix, bodies, **alice(4))
    assert answers[0]["predictions"] == ["setosa"] and answers[2]["predictions"] == ["virginica"]
    assert isinstance(answers[1], ServeClientError) and answers[1].status_code in (400, 422)
    assert isinstance(answers[3], ServeClientError) and answers[3].status_code == 422


def test_each_item_is_authorized_as_its_own_caller(example_app: Any) -> None:
    # Model 13 is granted to alice only; carol (same tenant) and eve (another) share her
    # call and are refused, each alone, never served from her authorization.
    tokens = [TOKENS["alice"], TOKENS["eve"], TOKENS["alice"], TOKENS["carol"]]
    answers = client().infer_many(
        example_app.route_prefix,
        [{"inputs": [ROWS[0]]}] * 4,
        model=13,
        tenant="acme",
        tokens=tokens,
    )
    assert answers[0]["predictions"] == answers[2]["predictions"] == ["setosa"]
    for refused in (answers[1], answers[3]):
        assert isinstance(refused, ServeClientError) and refused.status_code in (401, 403)


def test_slow_failing_and_quick_items_each_keep_their_own_outcome(probe_app: Any) -> None:
    c = client()
    kw = {"model": 22, "token": TOKENS["alice"], "tenant": "acme"}
    bodies = [{"tag": "a"}, {"sleep_s": 1.5, "tag": "slow"}, {"respond": "http_500"}, {"tag": "b"}]
    quick, slow, broken, other = c.infer_many(
        probe_app.route_prefix, bodies, model=22, tenant="acme", tokens=[TOKENS["alice"]] * 4
    )
    assert quick["echo"]["tag"] == "a" and other["echo"]["tag"] == "b"
    assert isinstance(broken, ServeServerError) and broken.status_code == 500
    assert isinstance(slow, Pending)  # deferred like a single call: polled as usual
    result = wait_for(
        lambda: (
            (
                (r := c.poll(probe_app.route_prefix, slow.ticket, **kw))
                and not isinstance(r, Pending)
            )
            and r
        ),
        timeout=20,
        interval=0.2,
        what="the deferred item's result",
    )
    assert result["echo"]["tag"] == "slow"


def _jwt() -> str:
    return client().model_token(model=12, token=TOKENS["alice"], tenant="acme")


def _items(n: int, caller: int = 0) -> list[dict[str, Any]]:
    return [{"caller": caller, "body": {"inputs": [ROWS[0]]}} for _ in range(n)]


@pytest.mark.parametrize(
    ("count_header", "body", "problem"),
    [
        ("3", lambda: {"callers": [_jwt()], "items": _items(2)}, "says 3 items; the body holds 2"),
        ("1", lambda: [{"inputs": [ROWS[0]]}], "must be an object, not list"),
        ("1000", lambda: {"callers": [_jwt()], "items": []}, "must be 1 to 256"),
        ("two", lambda: {}, "must be a number"),
        ("1", lambda: b"{not json", "must be JSON"),
        ("1", lambda: {"callers": ["not a token"], "items": _items(1)}, "must be a model token"),
        (
            "1",
            lambda: {"callers": [_jwt()], "items": _items(1, caller=5)},
            "item 0 names no caller",
        ),
        ("1", lambda: {"callers": [], "items": _items(1)}, "callers must be a list of 1 to 1"),
    ],
)
def test_a_malformed_coalesced_call_is_400_naming_what_is_wrong(
    example_app: Any, count_header: str, body: Any, problem: str
) -> None:
    c = client()
    headers = c.model_headers(model=12, token=TOKENS["alice"], tenant="acme")
    url = f"{c.base_url}{example_app.route_prefix}/"
    raw = body()
    content = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    r = httpx.post(
        url, content=content, headers={**headers, ITEMS_HEADER: count_header}, timeout=30
    )
    assert r.status_code == 400
    assert r.json()["detail"]["code"] == "invalid_items"
    assert problem in r.json()["detail"]["message"]


# -- the worker


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path / "redis").start()
    yield server
    server.close()


def test_queued_jobs_share_calls_and_each_is_written_once(
    admin: Any, worker_env: dict[str, str], example_app: Any, own_redis: RedisServer, tmp_path: Path
) -> None:
    port = free_port("127.0.0.1")
    env = {
        **worker_env,
        **FAULT_WORKER_ENV,
        "REDIS_URL": own_redis.url,
        "SYNAPSE_BRIDGE_METRICS_PORT": str(port),
        "SYNAPSE_BRIDGE_COALESCE_WAIT": "0.5",  # groups form for sure on a busy box
    }
    jobs = make_jobs(admin, 96, tag="coalesce")
    bad_id = f"coalesce-bad-{uuid.uuid4().hex[:8]}"
    bad = {**jobs[0].message, "job_id": bad_id, "json": {"inputs": "not rows"}}
    bad_job = Job(bad_id, bad, "")
    admin.create_jobs(
        [{"id": bad_id, "tenant": "acme", "plugin_release": RELEASE, "params": {"model": 12}}]
    )
    producer = Producer(own_redis.url, own_redis.url)
    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=16)
    try:
        producer.send([*jobs[:48], bad_job, *jobs[48:]])  # the bad one mid-queue
        worker.start()
        counts = wait_all_final(admin, jobs, timeout=300)
        wait_for(lambda: admin.job(bad_id)["status"] == "FAILED", timeout=60, what="bad job")
        seen = coalesced_calls(port)
        calls, items = seen["serve_calls"], seen["jobs_in_calls"]
    finally:
        worker.stop()
        producer.close()
    assert counts.lost == 0 and counts.written_twice == 0
    assert counts.succeeded == len(jobs), counts.failures
    for j in jobs[::7]:
        assert admin.job(j.job_id)["result"]["predictions"] == [j.expected]
    assert count(admin, [bad_job]).written_twice == 0
    assert "inputs" in str(admin.job(bad_id)["result"])  # its own error, named
    assert items == len(jobs) + 1
    assert calls < items, f"{items:.0f} jobs went in {calls:.0f} calls: none shared one"
