"""The producer, run as a subprocess per system and run (the broker URL is read once
per process): ``python -m bench.producer SYSTEM SPEC.json``.

``bridge`` sends with the project's ``worker.submit.submit`` (REDIS_URL from the
environment); ``peer`` with Ray's documented producer API for ``task_consumer``
(``instantiate_adapter_from_config(...).enqueue_task_sync``) to the peer's queue. Both
messages are the same job dict (the bridge's wire format, ``submitted_at`` included).

``--sequential BACKEND_URL``: one job at a time; after each send, poll the backend's
admin API until the job is final, and print per job when it was sent, when the backend
recorded its final write (its write log) and when the poll first saw it (W4). The
write time does not depend on the poll interval, and a slower poll (10 ms) loads the
backend less while the job runs. ``--rate R``: open loop, job i sent at start + i/R
whatever the system does (W6; a sender behind schedule sends at once, and says by how
much it fell behind). Otherwise send all as fast as possible. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _raw(job: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": job["id"],
        "tenant": job["tenant"],
        "token": job["token"],
        "model": job["model"],
        "method": "post",
        "release": release,
        "priority": 5,
        "submitted_at": time.time(),
        "json": job["json"],
    }


def prime(app: Any) -> None:
    """Connect to the broker and declare the queues before anything is timed: the
    first send would otherwise carry them (and, for the bridge, importing its tasks)."""
    from kombu.common import maybe_declare

    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
        for queue in app.amqp.queues.values():
            maybe_declare(queue, producer.channel, retry=True)


def bridge_sender(release: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    import worker.tasks  # noqa: F401  # what the first submit() would import
    from worker.app import app
    from worker.submit import submit

    prime(app)

    def send(job: dict[str, Any]) -> None:
        submit(
            job_id=job["id"],
            model=job["model"],
            token=job["token"],
            tenant=job["tenant"],
            release=release,
            json=job["json"],
        )

    return send


def peer_sender(
    release: dict[str, Any], redis_url: str, queue: str
) -> Callable[[dict[str, Any]], None]:
    from ray.serve.task_consumer import instantiate_adapter_from_config

    from bench.peer import TASK_NAME, processor_config

    adapter = instantiate_adapter_from_config(processor_config(redis_url, queue))
    prime(adapter._app)

    def send(job: dict[str, Any]) -> None:
        adapter.enqueue_task_sync(TASK_NAME, kwargs={"job": _raw(job, release)})

    return send


def send_at_rate(
    send: Callable[[dict[str, Any]], None], jobs: list[dict[str, Any]], rate: float
) -> dict[str, Any]:
    """Open loop: job i at start + i/rate, on a schedule the system's pace never moves."""
    if rate <= 0:
        raise ValueError(f"--rate must be positive, not {rate}")
    t0 = time.time()
    m0 = time.monotonic()
    lag_max = 0.0
    for i, job in enumerate(jobs):
        ahead = m0 + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        else:
            lag_max = max(lag_max, -ahead)
        send(job)
    send_s = time.time() - t0
    return {
        "sent": len(jobs),
        "first_send": t0,
        "send_s": send_s,
        "rate": rate,
        # n jobs span n - 1 intervals
        "sent_rate": round((len(jobs) - 1) / send_s, 2) if len(jobs) > 1 and send_s > 0 else None,
        "lag_max_s": round(lag_max, 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("system", choices=["bridge", "peer"])
    ap.add_argument("spec", type=Path, help="JSON: {release, jobs: [{id, model, tenant, ...}]}")
    ap.add_argument("--queue", default="synapse_peer")
    ap.add_argument("--sequential", metavar="BACKEND_URL", default=None)
    ap.add_argument("--poll-interval", type=float, default=0.01)
    ap.add_argument("--rate", type=float, default=None, help="jobs/s, open loop")
    args = ap.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    release, jobs = spec["release"], spec["jobs"]
    if args.system == "bridge":
        send = bridge_sender(release)
    else:
        send = peer_sender(release, os.environ["REDIS_URL"], args.queue)

    if args.rate is not None:
        print(json.dumps(send_at_rate(send, jobs, args.rate)))
        return 0
    if args.sequential is None:
        t0 = time.time()
        for job in jobs:
            send(job)
        print(json.dumps({"sent": len(jobs), "first_send": t0, "send_s": time.time() - t0}))
        return 0

    from local_backend.client import AdminClient

    seen: list[dict[str, Any]] = []
    with AdminClient(args.sequential) as admin:
        for job in jobs:
            t_send = time.time()
            send(job)
            deadline = time.monotonic() + 120
            while True:
                status = admin.job(job["id"])["status"]
                if status in FINAL:
                    break
                if time.monotonic() > deadline:
                    status = "TIMEOUT"
                    break
                time.sleep(args.poll_interval)
            t_seen = time.time()
            finals = [w for w in admin.writes(job["id"]) if w.get("status") in FINAL]
            # The backend's clock (this host), ISO 8601 UTC with microseconds.
            written = (
                datetime.fromisoformat(finals[0]["time"].replace("Z", "+00:00")).timestamp()
                if finals
                else None
            )
            seen.append(
                {"id": job["id"], "sent": t_send, "written": written}
                | {"seen": t_seen, "status": status}
            )
    print(json.dumps({"sent": len(jobs), "sequential": seen}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
