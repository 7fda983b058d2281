"""The worker end to end: real Redis, a real worker process, real Serve, the real backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from config import Settings
from devtools.redis_server import RedisServer
from tests.conftest import TOKENS, WorkerProcess, wait_for
from worker.app import create_app

pytestmark = pytest.mark.usefixtures("worker_proc")

RELEASE = {"code": "example-classifier", "version": "1.0.0"}
PROBE = {"code": "probe", "version": "0.1.0"}
ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]]
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def new_job(
    admin: Any,
    *,
    model: int = 12,
    tenant: str = "acme",
    release: dict | None = None,
    body: Any = None,
    items: list | None = None,
) -> str:
    job_id = uuid.uuid4().hex
    params: dict[str, Any] = {"model": model}
    if items is not None:
        params["items"] = items
    else:
        params["json"] = body if body is not None else {"inputs": ROWS}
    admin.create_job(id=job_id, tenant=tenant, plugin_release=release or RELEASE, params=params)
    return job_id


def send(
    job_id: str,
    *,
    user: str = "alice",
    model: int = 12,
    tenant: str = "acme",
    release: dict | None = None,
    body: Any = None,
    items: list | None = None,
    app: Any = None,
) -> None:
    from worker.submit import submit

    submit(
        app=app,
        job_id=job_id,
        model=model,
        token=TOKENS[user],
        tenant=tenant,
        release=release or RELEASE,
        json=None if items is not None else (body if body is not None else {"inputs": ROWS}),
        items=items,
    )


def wait_final(admin: Any, job_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(
        lambda: (j := admin.job(job_id))["status"] in FINAL and j,
        timeout=timeout,
        interval=0.1,
        what=f"job {job_id} final",
    )


def final_writes(admin: Any, job_id: str) -> list[dict[str, Any]]:
    return [w for w in admin.writes(job_id) if w["body"].get("status") in FINAL]


def test_single_job_succeeds_with_its_result(admin: Any) -> None:
    job_id = new_job(admin)
    send(job_id)
    job = wait_final(admin, job_id)
    assert job["status"] == "SUCCEEDED"
    assert job["result"]["predictions"] == ["setosa", "virginica"]
    metrics = job["metrics_record"]
    assert metrics["attempts"] == 1 and metrics["inference_s"] > 0 and "queue_wait_s" in metrics
    assert len(final_writes(admin, job_id)) == 1
    assert any(w["body"].get("status") == "RUNNING" for w in admin.writes(job_id))


def test_batch_job_keeps_item_order_and_reports_progress(admin: Any) -> None:
    rows = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0], [5.9, 2.8, 4.3, 1.3]]
    items = [{"inputs": [rows[i % 3]]} for i in range(10)]
    job_id = new_job(admin, items=items)
    send(job_id, items=items)
    job = wait_final(admin, job_id)
    assert job["status"] == "SUCCEEDED"
    expected = ["setosa", "virginica", "versicolor"]
    assert [r["predictions"][0] for r in job["result"]] == [expected[i % 3] for i in range(10)]
    assert job["progress_record"] == {"done": 10, "total": 10}
    assert job["metrics_record"]["items_total"] == 10
    assert len(final_writes(admin, job_id)) == 1


def test_batch_item_client_errors_are_kept_in_place(admin: Any) -> None:
    items = [{"inputs": ROWS[:1]}, {"inputs": [[1, 2]]}, {"inputs": ROWS[1:]}]
    job_id = new_job(admin, items=items)
    send(job_id, items=items)
    job = wait_final(admin, job_id)
    assert job["status"] == "SUCCEEDED"  # the default policy: partial
    assert job["result"][0]["predictions"] == ["setosa"]
    assert job["result"][1]["error"]["code"] == "invalid_input"
    assert job["result"][2]["predictions"] == ["virginica"]
    assert job["metrics_record"]["items_failed"] == 1


def test_client_error_fails_at_once_without_retry(admin: Any) -> None:
    job_id = new_job(admin, model=13)
    send(job_id, user="carol", model=13)  # carol has no grant on model 13: 403
    job = wait_final(admin, job_id)
    assert job["status"] == "FAILED"
    assert "403" in job["result"]["error"]
    assert job["metrics_record"]["attempts"] == 1
    running = [w for w in admin.writes(job_id) if w["body"].get("status") == "RUNNING"]
    assert len(running) == 1


def test_transient_503_is_retried_then_succeeds(admin: Any) -> None:
    # The replica's authorization call to the backend fails once with 503 -> the runtime
    # answers 503 (transient) -> the worker retries -> success. bob+model 16 is uncached.
    admin.set_faults(
        [
            {
                "path_prefix": "models/16/",
                "methods": ["GET"],
                "error_rate": 1.0,
                "error_status": 503,
                "limit": 1,
            }
        ]
    )
    try:
        job_id = new_job(admin, model=16, tenant="globex")
        send(job_id, user="eve", model=16, tenant="globex")
        job = wait_final(admin, job_id)
    finally:
        admin.clear_faults()
    assert job["status"] == "SUCCEEDED", job["result"]
    assert job["metrics_record"]["attempts"] == 2
    assert len(final_writes(admin, job_id)) == 1


def test_backend_write_failure_goes_to_outbox_then_is_delivered_once(admin: Any) -> None:
    from worker.services import services
    from worker.writeback import OUTBOX

    job_id = new_job(admin)
    admin.set_faults(
        [{"path_prefix": f"jobs/{job_id}/", "methods": ["PATCH", "GET"], "outage": True}]
    )
    try:
        send(job_id)
        wait_for(
            lambda: services().redis.hexists(OUTBOX, job_id),
            timeout=60,
            what="result in the outbox",
        )
        assert admin.job(job_id)["status"] == "PENDING"
    finally:
        admin.clear_faults()
    job = wait_final(admin, job_id)
    assert job["status"] == "SUCCEEDED"
    wait_for(lambda: not services().redis.hexists(OUTBOX, job_id), what="outbox emptied")
    assert len(final_writes(admin, job_id)) == 1


def test_redelivered_message_for_a_finished_job_is_skipped(admin: Any) -> None:
    job_id = new_job(admin)
    send(job_id)
    wait_final(admin, job_id)
    writes_before = len(admin.writes(job_id))
    # The same job again, as a redelivery would bring it; its task outcome is SKIPPED.
    from worker.submit import submit

    again = submit(
        job_id=job_id,
        model=12,
        token=TOKENS["alice"],
        tenant="acme",
        release=RELEASE,
        json={"inputs": ROWS},
    )
    assert again.get(timeout=30) == {"job_id": job_id, "status": "SKIPPED"}
    assert len(admin.writes(job_id)) == writes_before
    assert len(final_writes(admin, job_id)) == 1


@pytest.mark.parametrize("kind", ["single", "batch"])
def test_a_job_stopped_on_the_backend_is_never_written(admin: Any, kind: str) -> None:
    # A person stopped it before a worker got to it: the worker's status check at the
    # start skips it, and nothing is written over STOPPED.
    from worker.submit import submit

    job_id = uuid.uuid4().hex
    items = [{"inputs": ROWS}] * 3 if kind == "batch" else None
    params: dict[str, Any] = {"model": 12, **({"items": items} if items else {"json": {}})}
    admin.create_job(
        id=job_id, tenant="acme", plugin_release=RELEASE, params=params, status="STOPPED"
    )
    body: dict[str, Any] = {"items": items} if items else {"json": {"inputs": ROWS}}
    result = submit(
        job_id=job_id, model=12, token=TOKENS["alice"], tenant="acme", release=RELEASE, **body
    )
    assert result.get(timeout=30) == {"job_id": job_id, "status": "SKIPPED"}
    assert admin.writes(job_id) == []
    assert admin.job(job_id)["status"] == "STOPPED"


def test_invalid_message_is_quarantined_and_its_job_failed(admin: Any) -> None:
    from worker.app import app
    from worker.message import INVALID_QUEUE, TASK_NAME
    from worker.services import services

    job_id = new_job(admin)
    before = services().redis.llen(INVALID_QUEUE)
    app.send_task(TASK_NAME, kwargs={"job": {"job_id": job_id, "token": "x", "model": 12}})
    job = wait_final(admin, job_id)
    assert job["status"] == "FAILED"
    assert "release: Field required" in job["result"]["error"]
    wait_for(lambda: services().redis.llen(INVALID_QUEUE) > before, what="message quarantined")


def test_pickle_message_is_refused_and_quarantined(admin: Any) -> None:
    from kombu import Connection

    from worker.message import INVALID_QUEUE, QUEUE
    from worker.services import services

    before = services().redis.llen(INVALID_QUEUE)
    with Connection(os.environ["REDIS_URL"]) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish(
            [[], {"job": {"job_id": "pickled"}}, {}],
            routing_key=QUEUE,
            headers={
                "task": "synapse.inference.run",
                "id": uuid.uuid4().hex,
                "lang": "py",
                "argsrepr": "()",
                "kwargsrepr": "{}",
            },
        )
    wait_for(lambda: services().redis.llen(INVALID_QUEUE) > before, what="pickle quarantined")
    # and the worker still serves
    job_id = new_job(admin)
    send(job_id)
    assert wait_final(admin, job_id)["status"] == "SUCCEEDED"


def test_deferred_result_is_polled_to_success(admin: Any) -> None:
    job_id = new_job(admin, model=22, release=PROBE, body={"sleep_s": 1.5, "tag": "slow"})
    send(job_id, model=22, release=PROBE, body={"sleep_s": 1.5, "tag": "slow"})
    job = wait_final(admin, job_id)
    assert job["status"] == "SUCCEEDED"
    assert job["result"]["echo"]["tag"] == "slow"
    assert job["metrics_record"]["deferred"] is True
    assert job["metrics_record"]["polls"] >= 1


def test_intake_enqueues_each_pending_job_once(admin: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from worker.intake import Intake

    ids = [new_job(admin) for _ in range(5)]
    intake = Intake.from_settings()
    with ThreadPoolExecutor(3) as pool:
        counts = list(pool.map(lambda _: intake.poll_once(), range(3)))
    assert sum(counts) >= 5  # other tests' pending jobs may be picked up too
    for job_id in ids:  # claimed once; a later pass cannot enqueue them again
        assert not intake.claim(job_id)
    for job_id in ids:
        assert wait_final(admin, job_id)["status"] == "SUCCEEDED"
        assert len(final_writes(admin, job_id)) == 1
        running = [w for w in admin.writes(job_id) if w["body"].get("status") == "RUNNING"]
        assert len(running) == 1  # enqueued and run once


def test_logs_carry_job_id_and_never_a_token(admin: Any, worker_proc: WorkerProcess) -> None:
    job_id = new_job(admin)
    send(job_id)
    wait_final(admin, job_id)
    text = worker_proc.log_path.read_text(errors="replace")
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = [entry for entry in lines if entry.get("job_id") == job_id]
    assert any(entry["event"] == "job finished" for entry in mine)
    assert all({"task_id", "attempt"} <= set(entry) for entry in mine)
    for token in TOKENS.values():
        assert token not in text
    assert "eyJ" not in text


def test_transient_errors_past_the_bound_fail_and_dead_letter(admin: Any) -> None:
    from worker.message import DLQ
    from worker.services import services

    gone = {"code": "no-such-plugin", "version": "0"}  # the proxy answers 404: transient
    before = services().redis.llen(DLQ)
    job_id = new_job(admin, release=gone)
    send(job_id, release=gone)
    job = wait_final(admin, job_id, timeout=90)
    assert job["status"] == "FAILED"
    assert "gave up after 5 attempts" in job["result"]["error"]
    wait_for(lambda: services().redis.llen(DLQ) > before, what="dead letter")
    letters = [json.loads(m) for m in services().redis.lrange(DLQ, 0, -1)]
    mine = [m for m in letters if m["headers"]["kwargsrepr"].find(job_id) >= 0]
    assert mine, "the job's message is in the dead-letter queue"
    assert TOKENS["alice"] not in mine[0]["headers"]["kwargsrepr"]


def test_metrics_endpoint_counts_jobs(admin: Any, worker_env: dict[str, str]) -> None:
    import httpx

    job_id = new_job(admin)
    send(job_id)
    wait_final(admin, job_id)
    port = worker_env["SYNAPSE_BRIDGE_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'synapse_jobs_total{outcome="succeeded"}' in text
    assert "synapse_queue_depth" in text and "synapse_job_latency_seconds_bucket" in text


def test_cli_submit_single_and_batch(admin: Any, tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "SYNAPSE_ACCESS_TOKEN": TOKENS["alice"]}
    base = [
        sys.executable,
        "-m",
        "worker.cli",
        "submit",
        "--model",
        "12",
        "--tenant",
        "acme",
        "--release-code",
        "example-classifier",
        "--release-version",
        "1.0.0",
    ]
    out = subprocess.run(
        [*base, "--json", json.dumps({"inputs": ROWS})],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    single = json.loads(out.stdout.strip().splitlines()[-1])["job_id"]
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"inputs": [r]}) for r in ROWS * 3) + "\n")
    out = subprocess.run(
        [*base, "--file", str(items)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    batch = json.loads(out.stdout.strip().splitlines()[-1])["job_id"]
    assert wait_final(admin, single)["result"]["predictions"] == ["setosa", "virginica"]
    job = wait_final(admin, batch)
    assert [r["predictions"][0] for r in job["result"]] == ["setosa", "virginica"] * 3
    bad = subprocess.run(
        [*base, "--json", "{not json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert bad.returncode != 0 and "--json is not JSON" in bad.stderr


def test_deferred_job_does_not_hold_the_only_worker_slot(
    admin: Any, worker_env: dict[str, str], redis_url: str, session_dir: Any
) -> None:
    # A worker with one slot, on its own broker database: while the slow job is pending
    # on the replica, a quick job submitted after it runs and finishes first.

    url = redis_url.rsplit("/", 1)[0] + "/3"
    env = {**worker_env, "REDIS_URL": url, "SYNAPSE_BRIDGE_METRICS_PORT": "0"}
    solo = WorkerProcess(env, session_dir / "worker-solo.log", concurrency=1).start()
    from config import load_settings
    from worker.app import create_app

    solo_app = create_app(load_settings(redis_url=url))  # the producer's app on that broker
    try:
        slow = new_job(admin, model=22, release=PROBE, body={"sleep_s": 4, "tag": "slow"})
        send(slow, model=22, release=PROBE, body={"sleep_s": 4, "tag": "slow"}, app=solo_app)
        wait_for(
            lambda: any(w["body"].get("status") == "RUNNING" for w in admin.writes(slow)),
            what="slow job running",
        )
        quick = new_job(admin)
        send(quick, app=solo_app)
        quick_job = wait_final(admin, quick, timeout=30)
        slow_job = admin.job(slow)
        assert quick_job["status"] == "SUCCEEDED"
        assert slow_job["status"] == "RUNNING"  # still pending on the replica
        assert wait_final(admin, slow)["status"] == "SUCCEEDED"
    finally:
        solo.stop()


RABBIT_URL = os.environ.get("SYNAPSE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbit_reachable() -> bool:
    from kombu import Connection

    try:
        with Connection(RABBIT_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


def test_rabbitmq_broker_path(admin: Any, worker_env: dict[str, str], session_dir: Any) -> None:
    if not _rabbit_reachable():
        pytest.skip(f"no RabbitMQ at {RABBIT_URL} (set SYNAPSE_TEST_AMQP_URL)")
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**worker_env, "BROKER_URL": RABBIT_URL, "SYNAPSE_BRIDGE_METRICS_PORT": "0"}
    rabbit_worker = WorkerProcess(env, session_dir / "worker-amqp.log", concurrency=4).start()
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "submit",
                "--model",
                "12",
                "--tenant",
                "acme",
                "--release-code",
                "example-classifier",
                "--release-version",
                "1.0.0",
                "--json",
                json.dumps({"inputs": ROWS}),
            ],
            env={**os.environ, **env, "SYNAPSE_ACCESS_TOKEN": TOKENS["alice"]},
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        job_id = json.loads(out.stdout.strip().splitlines()[-1])["job_id"]
        job = wait_final(admin, job_id)
        assert job["status"] == "SUCCEEDED"
        assert job["result"]["predictions"] == ["setosa", "virginica"]
        assert len(final_writes(admin, job_id)) == 1
        assert job_id in rabbit_worker.log_path.read_text()  # run by the AMQP worker
    finally:
        rabbit_worker.stop()


# A worker whose consumer raises past Celery's connection-error handling, as the
# Redis transport did after a broker restart (tests/test_redis_transport.py).
_BROKEN_CONSUMER = """
import sys
import worker.consumer as consumer

def create_task_handler(self, *args, **kwargs):
    def on_message(message):
        raise AttributeError("broken consumer")
    return on_message

consumer.QuarantiningConsumer.create_task_handler = create_task_handler
from worker.cli import main
sys.argv = ["synapse-bridge", "worker", "-c", "2"]
main()
"""


def test_an_unrecoverable_consumer_error_exits_the_worker_with_failure(tmp_path: Any) -> None:
    """Celery logs "Unrecoverable error" and stops; the process must exit non-zero so a
    supervisor that restarts on failure brings the worker back (it exited 0)."""
    server = RedisServer(workdir=tmp_path / "redis").start()
    try:
        env = {**os.environ, "REDIS_URL": server.url, "SYNAPSE_BRIDGE_METRICS_PORT": "0"}
        env.pop("BROKER_URL", None)
        log = (tmp_path / "worker.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-c", _BROKEN_CONSUMER], env=env, stdout=log, stderr=log
        )
        try:
            create_app(Settings(redis_url=server.url)).send_task(
                "synapse.inference.run", kwargs={"job": {"job_id": "j-1"}}, queue="inference"
            )
            status = proc.wait(timeout=90)
        finally:
            proc.kill()
        text = (tmp_path / "worker.log").read_text()
        assert "Unrecoverable error" in text, text[-2000:]
        assert status == 1, text[-2000:]
    finally:
        server.close()
