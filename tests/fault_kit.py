"""Tools for the fault, load and bad-input scenarios: jobs, a producer, counting.

Each scenario submits real jobs through a real broker to real worker processes,
injects its faults into real processes, and counts from the backend's write log:
submitted, succeeded, failed, lost (never final), written twice (more than one final
write). Counts are appended to ``$SYNAPSE_RELIABILITY_OUT`` (default
``tests/.reliability/results.jsonl``); ``python -m tests.reliability_report``
renders docs/reliability.md from them.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT, TOKENS

RELEASE = {"code": "example-classifier", "version": "1.0.0"}
ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0], [5.9, 2.8, 4.3, 1.3]]
EXPECTED = ["setosa", "virginica", "versicolor"]
OUT = Path(
    os.environ.get("SYNAPSE_RELIABILITY_OUT", ROOT / "tests" / ".reliability" / "results.jsonl")
)

# (user, model, tenant): users allowed on their model
PAIRS = [("alice", 12, "acme"), ("bob", 14, "acme"), ("alice", 15, "acme"), ("eve", 16, "globex")]

# Settings of fault-scenario workers: retries that outlast a 20 s outage, redelivery
# (visibility timeout) within the test's patience, fast flushing.
FAULT_WORKER_ENV = {
    "SYNAPSE_BRIDGE_RETRY_MAX": "10",
    "SYNAPSE_BRIDGE_RETRY_BASE": "1",
    "SYNAPSE_BRIDGE_RETRY_CAP": "8",
    "SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT": "25",
    "SYNAPSE_BRIDGE_TASK_SOFT_TIME_LIMIT": "12",
    "SYNAPSE_BRIDGE_TASK_TIME_LIMIT": "20",
    "SYNAPSE_BRIDGE_BACKEND_TIMEOUT": "2",  # the final write: at most 3 x 2 + 5 s
    "SYNAPSE_BRIDGE_OUTBOX_FLUSH_INTERVAL": "0.5",
    "SYNAPSE_BRIDGE_METRICS_PORT": "0",
    "SYNAPSE_BRIDGE_LOG_LEVEL": "WARNING",
}


@dataclass
class Job:
    job_id: str
    message: dict[str, Any]
    expected: str


def make_jobs(admin: Any, n: int, *, tag: str) -> list[Job]:
    """``n`` single jobs over four models, two tenants and three users, created PENDING."""
    jobs = []
    for i in range(n):
        user, model, tenant = PAIRS[i % len(PAIRS)]
        job_id = f"{tag}-{i:05d}-{uuid.uuid4().hex[:8]}"
        body = {"inputs": [ROWS[i % 3]]}
        jobs.append(
            Job(
                job_id,
                {
                    "job_id": job_id,
                    "tenant": tenant,
                    "token": TOKENS[user],
                    "model": model,
                    "json": body,
                    "release": RELEASE,
                    "submitted_at": time.time(),
                },
                EXPECTED[i % 3],
            )
        )
    for start in range(0, n, 500):
        admin.create_jobs(
            [
                {
                    "id": j.job_id,
                    "tenant": j.message["tenant"],
                    "plugin_release": RELEASE,
                    "params": {"model": j.message["model"], "json": j.message["json"]},
                }
                for j in jobs[start : start + 500]
            ]
        )
    return jobs


class Producer:
    """Sends task messages to a given broker, as ``worker.submit`` would."""

    def __init__(self, broker_url: str, redis_url: str) -> None:
        import redis

        from config import load_settings
        from worker.app import create_app
        from worker.ledger import Ledger

        self.app = create_app(load_settings(broker_url=broker_url, redis_url=redis_url))
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        # The ledger's grace is the workers' visibility timeout, as in worker.submit.
        grace = float(FAULT_WORKER_ENV["SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT"])
        self.ledger = Ledger(self.redis, grace_s=grace)

    def send(self, jobs: list[Job]) -> None:
        """As ``worker.submit`` does: each job in the ledger, then published."""
        from worker.message import parse_job
        from worker.submit import send_message

        for j in jobs:
            send_message(parse_job(j.message), app=self.app, ledger=self.ledger)

    def send_raw(
        self,
        body: bytes,
        *,
        content_type: str,
        headers: dict[str, Any],
        content_encoding: str = "utf-8",
    ) -> None:
        from worker.message import QUEUE

        with self.app.producer_or_acquire() as producer:
            producer.publish(
                body,
                routing_key=QUEUE,
                exchange=QUEUE,
                headers=headers,
                content_type=content_type,
                content_encoding=content_encoding,
            )

    def close(self) -> None:
        self.app.close()
        self.redis.close()


@dataclass
class Counts:
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    written_twice: int = 0
    wrong_result: int = 0
    failures: list[str] = field(default_factory=list)


def count(admin: Any, jobs: list[Job]) -> Counts:
    """A job stopped counts as lost: no scenario here stops one."""
    o = admin.outcomes([j.job_id for j in jobs])
    return Counts(
        submitted=o.submitted,
        succeeded=o.succeeded,
        failed=o.failed,
        lost=o.not_final + o.stopped,
        written_twice=o.written_twice,
        failures=[str(admin.job(i).get("result") or {})[:300] for i in o.failed_ids[:5]],
    )


def check_results(admin: Any, jobs: list[Job], sample: int = 50) -> int:
    """Wrong predictions among a sample of succeeded jobs (the result is the real one)."""
    wrong = 0
    for j in jobs[:: max(1, len(jobs) // sample)]:
        job = admin.job(j.job_id)
        if job["status"] == "SUCCEEDED" and job["result"]["predictions"] != [j.expected]:
            wrong += 1
    return wrong


def wait_all_final(
    admin: Any, jobs: list[Job], timeout: float, on_progress: Callable[[int], None] | None = None
) -> Counts:
    deadline = time.monotonic() + timeout
    while True:
        c = count(admin, jobs)
        if on_progress:
            on_progress(c.succeeded + c.failed)
        if c.lost == 0 or time.monotonic() > deadline:
            return c
        time.sleep(0.5)


def wait_fraction_final(admin: Any, jobs: list[Job], fraction: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        c = count(admin, jobs)
        if c.succeeded + c.failed >= fraction * len(jobs):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"only {c.succeeded + c.failed} of {len(jobs)} final")
        time.sleep(0.2)


def coalesced_calls(metrics_port: int) -> dict[str, float]:
    """A worker's serve calls and the jobs they carried (``synapse_coalesced_call_items``)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    out = {}
    for part in ("count", "sum"):
        m = re.search(rf"^synapse_coalesced_call_items_{part} ([0-9.e+]+)$", text, re.M)
        out[part] = float(m.group(1)) if m else 0.0
    return {"serve_calls": out["count"], "jobs_in_calls": out["sum"]}


def record(
    scenario: str,
    *,
    load: str,
    faults: str,
    counts: Counts,
    rests_on: str,
    elapsed_s: float,
    extra: dict[str, Any] | None = None,
) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "scenario": scenario,
        "load": load,
        "faults": faults,
        "rests_on": rests_on,
        "elapsed_s": round(elapsed_s, 1),
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **{k: v for k, v in asdict(counts).items() if k != "failures"},
        **(extra or {}),
    }
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


# --- adversarial paths (tests/test_adversarial.py): one row per path


@dataclass
class PathCounts:
    jobs: int
    lost: int = 0  # never left PENDING/QUEUED
    stuck: int = 0  # left RUNNING with nothing to move it
    written_twice: int = 0  # more than one accepted final write
    cancel_overwritten: int = 0  # writes attempted (accepted or 409-refused) after a stop
    tokens_found: int = 0


def path_counts(
    admin: Any,
    job_ids: list[str],
    *,
    stopped: set[str] | None = None,
    tokens_found: int = 0,
) -> PathCounts:
    """Counts from the backend's write log, refused (409) attempts included."""
    c = PathCounts(jobs=len(job_ids), tokens_found=tokens_found)
    for job_id in job_ids:
        status = admin.job(job_id)["status"]
        if status in ("PENDING", "QUEUED"):
            c.lost += 1
        elif status == "RUNNING":
            c.stuck += 1
        writes = admin.writes(job_id)
        finals = [
            w
            for w in writes
            if not w.get("refused") and w["body"].get("status") in ("SUCCEEDED", "FAILED")
        ]
        if len(finals) > 1:
            c.written_twice += 1
        if stopped and job_id in stopped:
            stop_seq = min(w["seq"] for w in writes if w["body"].get("status") == "STOPPED")
            c.cancel_overwritten += sum(1 for w in writes if w["seq"] > stop_seq)
    return c


def tokens_at_rest(r: Any, tokens: list[str], logs: list[Path]) -> int:
    """Occurrences of ``tokens`` in every Redis key of ``r``'s database (queues, unacked
    messages, results, ledger, outbox, DLQ, invalid queue) and in the given logs."""
    found = 0
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == "string":
            values = [r.get(key) or ""]
        elif kind == "hash":
            values = [f"{k}={v}" for k, v in r.hgetall(key).items()]
        elif kind == "list":
            values = r.lrange(key, 0, -1)
        elif kind == "set":
            values = list(r.smembers(key))
        elif kind == "zset":
            values = r.zrange(key, 0, -1)
        else:
            values = []
        text = "\n".join([key, *values])
        found += sum(text.count(t) for t in tokens)
    for path in logs:
        if path.exists():
            text = path.read_text(errors="replace")
            found += sum(text.count(t) for t in tokens)
    return found


def record_path(path: str, counts: PathCounts, fault: str) -> None:
    """Append one adversarial path's counts for docs/reliability.md."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "kind": "path",
        "scenario": path,
        "faults": fault,
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **asdict(counts),
    }
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
