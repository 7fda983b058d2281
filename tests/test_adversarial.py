"""Adversarial paths of a job's life (issue 11, part A), end to end.

Real worker processes, real Redis, real Serve, the real local backend. Each test
drives one path that used to lose a job, strand it RUNNING, recompute it without
bound, overwrite a cancellation or leak a token, and records its counts for the
adversarial table of docs/reliability.md (``fault_kit.record_path``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import TOKENS, WorkerProcess, wait_for
from tests.fault_kit import PathCounts, path_counts, record_path, tokens_at_rest
from tests.test_worker import PROBE, RELEASE, ROWS, wait_final


def new_job(admin: Any, *, model: int = 12, release: dict | None = None, **params: Any) -> str:
    job_id = uuid.uuid4().hex
    if "items" not in params and "json" not in params:
        params["json"] = {"inputs": ROWS}
    admin.create_job(
        id=job_id,
        tenant="acme",
        plugin_release=release or RELEASE,
        params={"model": model, **params},
    )
    return job_id


def raw_job(
    job_id: str, *, model: int = 12, release: dict | None = None, **payload: Any
) -> dict[str, Any]:
    """A job message as a producer writes it (alice's plain token)."""
    if "items" not in payload and "json" not in payload:
        payload["json"] = {"inputs": ROWS}
    return {
        "job_id": job_id,
        "tenant": "acme",
        "token": TOKENS["alice"],
        "model": model,
        "release": release or RELEASE,
        "submitted_at": time.time(),
        **payload,
    }


def send(
    job_id: str, *, app: Any = None, model: int = 12, release: dict | None = None, **payload: Any
) -> None:
    from worker.message import parse_job
    from worker.submit import send_message

    raw = raw_job(job_id, model=model, release=release, **payload)
    send_message(parse_job(raw), app=app)


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)


def events(session_dir: Path, event: str) -> list[dict[str, Any]]:
    path = session_dir / "events.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == event]


@pytest.fixture
def own_worker(
    worker_env: dict[str, str], redis_url: str, session_dir: Path, example_app: Any, probe_app: Any
) -> Iterator[Any]:
    """Start a worker with extra settings on its own Redis database; yields a factory
    returning ``(worker, producer_app)``."""
    from config import load_settings
    from worker.app import create_app

    started: list[WorkerProcess] = []

    def start(db: int, **extra: str) -> tuple[WorkerProcess, Any]:
        url = redis_url.rsplit("/", 1)[0] + f"/{db}"
        env = {**worker_env, "REDIS_URL": url, "SYNAPSE_BRIDGE_METRICS_PORT": "0", **extra}
        proc = WorkerProcess(env, session_dir / f"worker-db{db}.log", concurrency=4).start()
        started.append(proc)
        return proc, create_app(load_settings(redis_url=url))

    yield start
    for proc in started:
        proc.stop()


# --- A3: every exit path ends in a final write, a retry, or the message back on the queue


@pytest.mark.usefixtures("worker_proc")
def test_a_poll_message_that_cannot_be_decoded_fails_its_job(admin: Any) -> None:
    """A poll task whose arguments are broken used to raise, be acked, and leave the job
    non-final for ever. Now the message is quarantined and the job FAILED."""
    from worker.app import app
    from worker.message import POLL_TASK_NAME

    job_id = new_job(admin)
    job = raw_job(job_id)
    app.send_task(POLL_TASK_NAME, kwargs={"job": job, "ticket": 42}, kwargsrepr="{}")
    final = wait_final(admin, job_id, timeout=30)
    assert final["status"] == "FAILED"
    assert "poll" in final["result"]["error"]
    counts = path_counts(admin, [job_id], tokens_found=leaked())
    record_path(
        "A3 undecodable poll message", counts, "poll task with a ticket that is not a string"
    )
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


@pytest.mark.usefixtures("worker_proc")
def test_a_redis_error_while_settling_puts_the_message_back(admin: Any) -> None:
    """The outbox key holds the wrong type: every Redis call of the write-back fails
    (a non-transient Redis error). The message must go back on the queue, not be
    acked with its job left non-final; once Redis is right again the job finishes."""
    from worker.writeback import OUTBOX

    r = redis_client()
    saved = r.hgetall(OUTBOX)
    r.delete(OUTBOX)
    r.set(OUTBOX, "not a hash")
    try:
        job_id = new_job(admin)
        send(job_id)

        def retries_logged() -> int:
            lines = _worker_log_tail().splitlines()
            return sum(1 for line in lines if job_id in line and "retrying" in line)

        # Past the retry bound (RETRY_MAX=4, each delay at most 1 s) with Redis broken.
        wait_for(lambda: retries_logged() >= 4, timeout=60, what="every retry used up")
        broken_until = time.monotonic() + 3
        wait_for(lambda: time.monotonic() > broken_until, timeout=5, what="the last attempt")
        assert admin.job(job_id)["status"] == "PENDING"
    finally:
        r.delete(OUTBOX)
        if saved:
            r.hset(OUTBOX, mapping=saved)
    final = wait_final(admin, job_id, timeout=60)
    assert final["status"] in ("SUCCEEDED", "FAILED")
    counts = path_counts(admin, [job_id], tokens_found=leaked())
    record_path(
        "A3 Redis error while settling",
        counts,
        "WRONGTYPE on the outbox for every write, then repaired",
    )
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


def leaked() -> int:
    """The user's token found at rest: every key of the session's Redis, worker logs."""
    logs = list(Path(os.environ["SYNAPSE_TEST_EVENTS_DIR"]).glob("worker*.log"))
    return tokens_at_rest(redis_client(), [TOKENS["alice"]], logs)


def jobs_counted(port: str) -> dict[str, float]:
    """``synapse_jobs_total`` by outcome, from the session worker's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith('synapse_jobs_total{outcome="'):
            label, value = line.split('"')[1], line.rsplit(" ", 1)[1]
            out[label] = float(value)
    return out


def _worker_log_tail() -> str:
    """The session worker's log (tests/conftest.py's ``worker_proc``)."""
    path = Path(os.environ["SYNAPSE_TEST_EVENTS_DIR"]) / "worker.log"
    return path.read_text()[-200_000:] if path.exists() else ""


# --- A5: nothing is written over STOPPED


@pytest.mark.usefixtures("worker_proc")
def test_a_job_stopped_mid_run_is_not_overwritten(
    admin: Any, session_dir: Path, worker_env: dict[str, str]
) -> None:
    """Stopped while its inference runs: the final write sees STOPPED and drops the
    result; no write of the worker's lands (or is even attempted) after the stop, and
    the jobs counter says so (A14: a dropped result is not counted as succeeded)."""
    port = worker_env["SYNAPSE_BRIDGE_METRICS_PORT"]
    before = jobs_counted(port)
    body = {"sleep_s": 0.4, "count": f"stop-{uuid.uuid4().hex[:8]}"}
    job_id = new_job(admin, model=22, release=PROBE, json=body)
    send(job_id, model=22, release=PROBE, json=body)
    wait_for(
        lambda: (
            events(session_dir, "infer")
            and any(e["count"] == body["count"] for e in events(session_dir, "infer"))
        ),
        timeout=30,
        what="inference started",
    )
    admin.stop_job(job_id)
    # The worker has written its final outcome somewhere: its done marker is set.
    from worker.writeback import DONE_PREFIX

    wait_for(
        lambda: redis_client().exists(DONE_PREFIX + job_id),
        timeout=30,
        what="the worker settled the job",
    )
    assert admin.job(job_id)["status"] == "STOPPED"
    counts = path_counts(admin, [job_id], stopped={job_id}, tokens_found=leaked())
    record_path("A5 job stopped mid-run", counts, "STOPPED by a person while the serve call runs")
    assert counts.cancel_overwritten == 0
    after = jobs_counted(port)
    assert after.get("already_final", 0) == before.get("already_final", 0) + 1
    assert after.get("succeeded", 0) == before.get("succeeded", 0)
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


# --- A6: poll errors counted, not polls


@pytest.mark.usefixtures("worker_proc")
def test_a_long_deferred_job_survives_one_transient_poll_error(
    admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that has polled 100 times meets one transient error (the serve proxy
    unreachable): it polls again, it is not failed. The poll runs here, in-process,
    against a closed port; the next poll goes to the session worker, whose real Serve
    no longer knows the ticket, so the job is submitted again and succeeds."""
    from tests.conftest import _reset_process_singletons
    from worker.tasks import poll

    job_id = new_job(admin)
    job = raw_job(job_id)
    monkeypatch.setenv("SYNAPSE_SERVE_URL", "http://127.0.0.1:9")  # nothing listens
    _reset_process_singletons()
    try:
        poll.apply(
            kwargs={
                "job": job,
                "ticket": "t-" + uuid.uuid4().hex,
                "first_pending_at": time.time() - 120,
                "started": time.time() - 121,
                "attempt": 1,
                "polls": 100,
            }
        )
    finally:
        monkeypatch.undo()
        _reset_process_singletons()
    final = wait_final(admin, job_id, timeout=60)
    assert final["status"] == "SUCCEEDED", final["result"]
    counts = path_counts(admin, [job_id], tokens_found=leaked())
    record_path(
        "A6 transient poll error after 100 polls", counts, "serve proxy unreachable for one poll"
    )
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


# --- A7: time limits enforced inside the job


def test_a_batch_job_past_its_time_limit_fails_once(admin: Any, own_worker: Any) -> None:
    """Soft limit 2 s, a batch item of 5 s: the job FAILS with the time limit, once,
    and is not delivered again while or after it runs (visibility timeout 12 s, above
    the 2 s limit plus the final write's 8 s)."""
    _, producer = own_worker(
        6,
        SYNAPSE_BRIDGE_TASK_SOFT_TIME_LIMIT="2",
        SYNAPSE_BRIDGE_TASK_TIME_LIMIT="3",
        SYNAPSE_BRIDGE_BACKEND_TIMEOUT="1",
        SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT="12",
    )
    items = [{"sleep_s": 5, "tag": "slow"}]
    job_id = new_job(admin, model=22, release=PROBE, items=items)
    t0 = time.monotonic()
    send(job_id, app=producer, model=22, release=PROBE, items=items)
    final = wait_final(admin, job_id, timeout=30)
    took = time.monotonic() - t0
    assert final["status"] == "FAILED", final["result"]
    assert "time limit" in json.dumps(final["result"])
    assert took < 5, f"the limit was not enforced: final after {took:.1f}s"
    # Past the visibility timeout: no second delivery ran it again.
    wait_for(lambda: time.monotonic() - t0 > 14, timeout=20, what="past the visibility timeout")
    running = [w for w in admin.writes(job_id) if w["body"].get("status") == "RUNNING"]
    assert len(running) == 1
    counts = path_counts(admin, [job_id], tokens_found=leaked())
    record_path(
        "A7 batch past its time limit", counts, "soft limit 2 s, a 5 s item, visibility 12 s"
    )
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


# --- A8: a job the backend does not know is a wrong message


@pytest.mark.usefixtures("worker_proc")
@pytest.mark.parametrize("kind", ["single", "batch"])
def test_a_job_unknown_to_the_backend_goes_to_the_invalid_queue(admin: Any, kind: str) -> None:
    from worker.message import INVALID_QUEUE

    r = redis_client()
    before = r.llen(INVALID_QUEUE)
    job_id = "unknown-" + uuid.uuid4().hex  # never created on the backend
    if kind == "batch":
        send(job_id, items=[{"inputs": ROWS[:1]}])
    else:
        send(job_id)
    wait_for(
        lambda: any(job_id in m for m in r.lrange(INVALID_QUEUE, 0, -1)),
        timeout=30,
        what="the message in the invalid queue",
    )
    assert r.llen(INVALID_QUEUE) == before + 1
    retried = [
        line for line in _worker_log_tail().splitlines() if job_id in line and "retrying" in line
    ]
    assert retried == []
    counts = PathCounts(jobs=1, tokens_found=leaked())  # not on the backend: nothing to lose
    record_path(f"A8 job unknown to the backend ({kind})", counts, "GET jobs/{id}/ answers 404")
    assert counts.tokens_found == 0


# --- A13: a failed batch item does not waste its chunk


@pytest.mark.usefixtures("worker_proc")
def test_a_failed_item_does_not_recompute_the_rest_of_its_chunk(
    admin: Any, session_dir: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    items = [{"count": f"{tag}-{i}"} for i in range(3)] + [{"fail": True}]
    job_id = new_job(admin, model=22, release=PROBE, items=items)
    send(job_id, model=22, release=PROBE, items=items)
    final = wait_final(admin, job_id, timeout=90)
    assert final["status"] == "FAILED"  # the failing item outlasts every retry
    runs = [e["count"] for e in events(session_dir, "infer") if str(e["count"]).startswith(tag)]
    assert sorted(runs) == sorted(f"{tag}-{i}" for i in range(3)), runs
    counts = path_counts(admin, [job_id], tokens_found=leaked())
    record_path("A13 failing batch item", counts, "one item of a 4-item chunk fails on every try")
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


# --- A1: a message lost between the broker's pop and the worker's record of it


def test_a_message_lost_between_pop_and_ack_is_republished(
    admin: Any, redis_url: str, own_worker: Any
) -> None:
    """Published, then taken off the broker's list as a worker killed right after BRPOP
    leaves it: the ledger's sweep, in a real worker, publishes it again once the queue
    is empty and the grace (the visibility timeout) has passed."""
    from config import load_settings
    from worker.app import create_app
    from worker.ledger import Ledger
    from worker.message import QUEUE, parse_job
    from worker.submit import send_message

    db = 7
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    job_id = new_job(admin)
    raw = raw_job(job_id)
    grace = 12.0
    send_message(
        parse_job(raw),
        app=create_app(load_settings(redis_url=url)),
        ledger=Ledger(r, grace_s=grace),
    )
    lists = [k for k in r.scan_iter(f"{QUEUE}*") if r.type(k) == "list"]
    assert sum(r.llen(k) for k in lists) == 1
    for k in lists:
        r.delete(k)  # the pop: no worker will ever see this delivery
    own_worker(
        db,
        SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT=str(int(grace)),
        SYNAPSE_BRIDGE_TASK_SOFT_TIME_LIMIT="2",
        SYNAPSE_BRIDGE_TASK_TIME_LIMIT="3",
        SYNAPSE_BRIDGE_BACKEND_TIMEOUT="1",
    )
    final = wait_final(admin, job_id, timeout=60)
    assert final["status"] == "SUCCEEDED"
    counts = path_counts(admin, [job_id], tokens_found=leaked())
    record_path(
        "A1 message lost between pop and ack",
        counts,
        "message removed from the broker's list before any worker recorded it",
    )
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


# --- A2 and A4: what the backend refuses or garbles does not strand the job


@pytest.mark.usefixtures("worker_proc")
def test_a_result_too_large_for_the_backend_fails_the_job_with_its_size(admin: Any) -> None:
    items = [{"inputs": [ROWS[i % 2]]} for i in range(60)]
    job_id = new_job(admin, items=items)
    admin.set_faults(
        [{"path_prefix": f"jobs/{job_id}/", "methods": ["PATCH"], "max_body_bytes": 2000}]
    )
    try:
        send(job_id, items=items)
        final = wait_final(admin, job_id, timeout=60)
    finally:
        admin.clear_faults()
    assert final["status"] == "FAILED"
    error = json.dumps(final["result"])
    assert "large" in error and "bytes" in error, error
    counts = path_counts(admin, [job_id], tokens_found=leaked())
    record_path(
        "A4 result too large (413)", counts, "the backend refuses PATCH bodies over 2000 bytes"
    )
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)


@pytest.mark.usefixtures("worker_proc")
def test_a_garbled_answer_to_one_write_does_not_hold_up_the_next(admin: Any) -> None:
    first, second = new_job(admin), new_job(admin)
    admin.set_faults(
        [{"path_prefix": f"jobs/{first}/", "methods": ["PATCH"], "non_json_rate": 1.0}]
    )
    try:
        send(first)
        send(second)
        assert wait_final(admin, second, timeout=60)["status"] == "SUCCEEDED"
        done = wait_final(admin, first, timeout=60)  # applied, its answer unreadable
    finally:
        admin.clear_faults()
    assert done["status"] == "SUCCEEDED"
    counts = path_counts(admin, [first, second], tokens_found=leaked())
    record_path(
        "A2 2xx answer that is not JSON",
        counts,
        "the backend answers a job's PATCHes with an HTML page",
    )
    assert (counts.lost, counts.stuck, counts.written_twice, counts.tokens_found) == (0, 0, 0, 0)
