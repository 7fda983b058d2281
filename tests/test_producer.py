"""A process that only sends jobs (the backend's producer, a script) needs the broker,
Redis for the ledger and the sealing key: not the backend's URL, and not the worker's
HTTP clients. ``submit()`` used to build the whole worker's services for its ledger, so
a producer without ``SYNAPSE_HOST`` failed with "no backend URL", and its first job
waited for the worker's clients to be built after its ``submitted_at`` was stamped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker.ledger import ENTRY_PREFIX
from worker.sealing import is_sealed

ROOT = Path(__file__).resolve().parents[1]
KEY = "Xixvx7dedZpoijV7G-vKTu0ZuWMqVoC5i06xp6M7Dj8="

PRODUCER = """
import json
from worker.submit import submit
from worker import services
r = submit(job_id="producer-only-1", model=1, token="tok-producer-secret", tenant="acme",
           release={"code": "example-classifier", "version": "1.0.0"}, json={"x": 1})
print(json.dumps({"task_id": r.id, "worker_services_built": services._current is not None}))
"""


@pytest.fixture
def producer_redis(redis_url: str) -> Iterator[str]:
    """A database of the session's Redis that no worker consumes."""
    url = redis_url.rsplit("/", 1)[0] + "/8"  # no other test uses it
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()
    r.close()


def test_submit_needs_neither_backend_url_nor_worker_services(producer_redis: str) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SYNAPSE_", "REDIS_URL", "BROKER_URL", "RAY_"))
    }
    env.update({"REDIS_URL": producer_redis, "SYNAPSE_BRIDGE_SEALING_KEY": KEY})
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["worker_services_built"] is False

    r = redis.Redis.from_url(producer_redis, decode_responses=True)
    try:
        entry = r.get(ENTRY_PREFIX + "producer-only-1")  # recorded before publishing
        assert entry is not None
        assert is_sealed(json.loads(entry)["token"])
        queued = [k for k in r.keys("inference*") if r.type(k) == "list"]
        bodies = [m for k in queued for m in r.lrange(k, 0, -1)]
        assert len(bodies) == 1 and out["task_id"] in bodies[0]
        assert "tok-producer-secret" not in bodies[0] + entry
    finally:
        r.close()
