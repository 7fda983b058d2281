"""No user token at rest (issue 11, A9): the end-to-end search.

A user of our own (a fresh token no other test knows) sends, through the session's
real worker, real Serve and the real local backend:

* a deferred job (the probe sleeps, the replica answers with a ticket, polls are
  scheduled as later tasks),
* a retried job (the replica's authorization call meets 503s: retries with backoff),
* a job retried past the bound (dead-letter queue),
* an invalid job sent as an outside producer sends it (Celery's default kwargsrepr,
  which quotes the token), and an unknown task carrying a job (the consumer's
  quarantine).

While they are in flight, over and over: every key of every Redis database (strings,
hashes, lists, sets, sorted sets, streams; message bodies base64-decoded, the unacked
hash's envelopes opened), and ``inspect active/reserved/scheduled/query_task``
against the worker. After: the same once more, the dead-letter and invalid queues,
and the worker's whole log. The plain token must appear nowhere. A positive control:
the sealed token is seen in the broker while the jobs are in flight (the scan reads
the messages), and the in-flight states were really seen (a poll or retry scheduled).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from typing import Any

import pytest
import redis

from tests.conftest import WorkerProcess, wait_for
from tests.fault_kit import path_counts, record_path

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("worker_proc")]

ROWS = [[5.0, 3.4, 1.5, 0.2]]
CLASSIFIER = {"code": "example-classifier", "version": "1.0.0"}
PROBE = {"code": "probe", "version": "0.1.0"}
GONE = {"code": "no-such-plugin", "version": "0"}  # the proxy answers 404: transient
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _texts_of_message(raw: bytes) -> list[str]:
    """A kombu message as stored in Redis, opened: the raw text, and the body decoded
    when it is base64 (queued: the envelope; unacked: ``[envelope, exchange, key]``)."""
    out = [raw.decode(errors="replace")]
    try:
        doc = json.loads(raw)
    except Exception:
        return out
    if isinstance(doc, list) and doc:  # an unacked entry
        doc = doc[0]
        if isinstance(doc, str):
            with contextlib.suppress(Exception):
                doc = json.loads(doc)
    if not isinstance(doc, dict):
        return out
    encoding = (doc.get("properties") or {}).get("body_encoding")
    if encoding == "base64" and isinstance(doc.get("body"), str):
        # Not base64 after all: its text is searched as it is.
        with contextlib.suppress(ValueError):
            out.append(base64.b64decode(doc["body"]).decode(errors="replace"))
    return out


def dump_redis(url: str) -> dict[str, list[str]]:
    """Every key of every database on the server, as texts to search."""
    base = redis.Redis.from_url(url)
    dbs = [int(k[2:]) for k in base.info("keyspace")] or [0]
    base.close()
    out: dict[str, list[str]] = {}
    for db in dbs:
        r = redis.Redis.from_url(url.rsplit("/", 1)[0] + f"/{db}")
        try:
            for key in r.scan_iter(count=1000):
                name = f"db{db}:{key.decode(errors='replace')}"
                kind = r.type(key)
                texts: list[str] = [name]
                try:
                    if kind == b"string":
                        texts += _texts_of_message(r.get(key) or b"")
                    elif kind == b"hash":
                        for f, v in r.hgetall(key).items():
                            texts.append(f.decode(errors="replace"))
                            texts += _texts_of_message(v)
                    elif kind == b"list":
                        for m in r.lrange(key, 0, -1):
                            texts += _texts_of_message(m)
                    elif kind == b"set":
                        texts += [m.decode(errors="replace") for m in r.smembers(key)]
                    elif kind == b"zset":
                        texts += [m.decode(errors="replace") for m in r.zrange(key, 0, -1)]
                    elif kind == b"stream":
                        for _id, fields in r.xrange(key):
                            for f, v in fields.items():
                                texts += [f.decode(errors="replace"), *_texts_of_message(v)]
                except redis.ResponseError:
                    continue  # the key changed type or vanished between calls
                out[name] = texts
        finally:
            r.close()
    return out


def inspect_all(app: Any, task_ids: list[str]) -> dict[str, Any]:
    inspect = app.control.inspect(timeout=0.5)
    return {
        "active": inspect.active(),
        "active_unsafe": inspect.active(safe=False),
        "reserved": inspect.reserved(),
        "scheduled": inspect.scheduled(),
        "query_task": inspect.query_task(*task_ids) if task_ids else None,
    }


def test_no_token_at_rest_while_jobs_are_in_flight(
    admin: Any, redis_url: str, worker_proc: WorkerProcess, worker_env: dict[str, str]
) -> None:
    from config.settings import get_settings
    from worker.app import app
    from worker.message import DLQ, INVALID_QUEUE, TASK_NAME
    from worker.sealing import PREFIX
    from worker.submit import submit

    get_settings.cache_clear()
    tag = uuid.uuid4().hex[:10]
    token = f"tok-atrest-{tag}-0123456789"
    user = f"atrest-{tag}"
    admin.seed(
        {"tenants": ["acme"], "users": [{"name": user, "token": token, "tenants": ["acme"]}]}
    )

    def job(model: int, release: dict[str, Any], body: dict[str, Any]) -> str:
        job_id = f"atrest-{uuid.uuid4().hex[:12]}"
        admin.create_job(
            id=job_id, tenant="acme", plugin_release=release, params={"model": model, "json": body}
        )
        return job_id

    def send(job_id: str, model: int, release: dict[str, Any], body: dict[str, Any]) -> str:
        res = submit(
            job_id=job_id, model=model, token=token, tenant="acme", release=release, json=body
        )
        return res.id

    deferred_body = {"sleep_s": 10, "tag": "atrest"}
    deferred = job(22, PROBE, deferred_body)
    retried = job(21, CLASSIFIER, {"inputs": ROWS})
    dead = job(12, GONE, {"inputs": ROWS})
    invalid = job(12, CLASSIFIER, {"inputs": ROWS})
    unknown = f"atrest-{uuid.uuid4().hex[:12]}"
    admin.set_faults(
        [
            {
                "path_prefix": "models/21/",
                "methods": ["GET"],
                "error_rate": 1.0,
                "error_status": 503,
                "limit": 3,
            }
        ]
    )
    task_ids: list[str] = []
    found: list[str] = []
    seen = {"sealed_in_broker": 0, "eta_in_broker": 0, "scheduled": 0, "active": 0, "rounds": 0}
    r = redis.Redis.from_url(redis_url)

    def quarantined() -> list[bytes]:
        return [
            m
            for m in r.lrange(INVALID_QUEUE, 0, -1)
            if any(j in "".join(_texts_of_message(m)) for j in (invalid, unknown))
        ]

    try:
        # First, as an outside producer sends: a plain token, Celery's own kwargsrepr.
        # Such a message holds the plain token until the worker takes it (it is not
        # ours to seal): the scans start once both are quarantined.
        bad = {
            "job_id": invalid,
            "tenant": "acme",
            "token": token,
            "model": 12,
            "json": {"inputs": ROWS},
            "release": CLASSIFIER,
            "priority": 42,
        }
        task_ids.append(app.send_task(TASK_NAME, kwargs={"job": bad}).id)
        task_ids.append(
            app.send_task(
                "synapse.inference.no_such_task",
                kwargs={"job": {**bad, "job_id": unknown, "priority": 5}},
            ).id
        )
        wait_for(lambda: len(quarantined()) >= 2, timeout=30, what="both invalid quarantined")
        wait_for(lambda: admin.job(invalid)["status"] == "FAILED", timeout=30, what="FAILED")

        task_ids.append(send(deferred, 22, PROBE, deferred_body))
        task_ids.append(send(retried, 21, CLASSIFIER, {"inputs": ROWS}))
        task_ids.append(send(dead, 12, GONE, {"inputs": ROWS}))

        def scan(where: str) -> None:
            for name, texts in dump_redis(redis_url).items():
                for text in texts:
                    if token in text:
                        found.append(f"{where}: redis {name}: {text[:300]}")
                    if PREFIX in text:
                        seen["sealed_in_broker"] += 1
                    if '"eta": "' in text:  # a retry or poll waiting for its time
                        seen["eta_in_broker"] += 1
            answers = inspect_all(app, task_ids)
            text = json.dumps(answers, default=str)
            if token in text:
                found.append(f"{where}: inspect: {text[:600]}")
            for key in ("scheduled", "active"):
                seen[key] += sum(len(v) for v in (answers[key] or {}).values())

        def all_final() -> bool:
            return all(admin.job(j)["status"] in FINAL for j in (deferred, retried, dead))

        deadline = time.monotonic() + 120
        while not all_final() and time.monotonic() < deadline:
            seen["rounds"] += 1
            scan(f"in flight, round {seen['rounds']}")
            time.sleep(0.2)
    finally:
        admin.clear_faults()

    states = {j: admin.job(j) for j in (deferred, retried, dead, invalid)}
    assert states[deferred]["status"] == "SUCCEEDED", states[deferred]["result"]
    assert states[deferred]["metrics_record"].get("deferred") is True
    assert states[retried]["status"] == "SUCCEEDED", states[retried]["result"]
    assert states[retried]["metrics_record"]["attempts"] >= 2
    assert states[dead]["status"] == "FAILED"
    wait_for(
        lambda: any(dead in m for m in map(bytes.decode, r.lrange(DLQ, 0, -1))),
        timeout=30,
        what="the dead letter",
    )
    scan("after")
    log = worker_proc.log_path.read_text(errors="replace")
    if token in log:
        lines = [ln for ln in log.splitlines() if token in ln]
        found += [f"worker log: {ln[:300]}" for ln in lines[:10]]
    report = (
        f"{len(found)} places hold the plain token; rounds={seen['rounds']}, "
        f"sealed tokens seen={seen['sealed_in_broker']}, scheduled seen={seen['scheduled']}, "
        f"eta messages seen={seen['eta_in_broker']}, active seen={seen['active']}"
    )
    print(report)
    counts = path_counts(admin, [deferred, retried, dead], tokens_found=len(found))
    record_path(
        "A9 tokens at rest (deferred, retried, dead-lettered, invalid jobs)",
        counts,
        "Redis (every key, every db), queues, unacked, DLQ, invalid queue, inspect, worker log "
        f"scanned {seen['rounds']} times while in flight",
    )
    assert not found, report + "\n" + "\n".join(found[:40])
    # The scan read real in-flight state: sealed tokens in the broker, a poll or retry
    # waiting for its time (in inspect's scheduled, or its message in the broker).
    assert seen["rounds"] >= 2 and seen["sealed_in_broker"] > 0, report
    assert seen["scheduled"] + seen["eta_in_broker"] > 0, report
