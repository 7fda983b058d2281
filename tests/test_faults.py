"""Faults injected into real processes: the worker killed, Serve gone, the backend
failing, the broker restarted, a 10,000-job burst. Every job ends on the backend
exactly once, SUCCEEDED, whatever fails in between.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.redis_server import RedisServer
from local_backend.server import free_port
from tests.conftest import EXAMPLE_PLUGIN, WorkerProcess, wait_for
from tests.fault_kit import (
    FAULT_WORKER_ENV,
    Counts,
    Producer,
    check_results,
    coalesced_calls,
    count,
    make_jobs,
    record,
    wait_all_final,
    wait_fraction_final,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

N = 2000


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True, workdir=tmp_path / "redis").start()
    yield server
    server.close()


def start_workers(
    worker_env: dict[str, str],
    redis_url: str,
    log: Path,
    *,
    concurrency: int = 16,
    broker_url: str | None = None,
    **extra: str,
) -> WorkerProcess:
    env = {**worker_env, **FAULT_WORKER_ENV, "REDIS_URL": redis_url, **extra}
    if broker_url:
        env["BROKER_URL"] = broker_url
    return WorkerProcess(env, log, concurrency=concurrency).start()


def assert_exactly_once(admin: Any, jobs: list[Any], counts: Counts) -> None:
    assert counts.lost == 0, f"{counts.lost} jobs never reached a final status"
    assert counts.written_twice == 0, f"{counts.written_twice} jobs written twice"
    assert counts.failed == 0, f"{counts.failed} failed: {counts.failures}"
    assert counts.succeeded == counts.submitted
    counts.wrong_result = check_results(admin, jobs)
    assert counts.wrong_result == 0


def test_r1_worker_killed_mid_run(
    admin: Any,
    worker_env: dict[str, str],
    example_app: Any,
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    port = free_port("127.0.0.1")
    worker = start_workers(
        worker_env,
        fresh_redis.url,
        tmp_path / "worker-1.log",
        SYNAPSE_BRIDGE_METRICS_PORT=str(port),
    )
    jobs = make_jobs(admin, N, tag="r1")
    started = time.monotonic()
    producer = Producer(fresh_redis.url, fresh_redis.url)
    producer.send(jobs)
    try:
        wait_fraction_final(admin, jobs, 0.3, timeout=600)
        calls = coalesced_calls(port)  # jobs share serve calls: the kill lands mid-group
        worker.kill()  # SIGKILL: no goodbye, unacked messages stay with the broker
        worker = start_workers(worker_env, fresh_redis.url, tmp_path / "worker-2.log")
        counts = wait_all_final(admin, jobs, timeout=900)
    finally:
        worker.stop()
        producer.close()
    record(
        "R1 worker killed",
        load=f"{N} jobs, 16 threads",
        faults="SIGKILL of the worker at 30% done (coalescing on), then a new worker",
        counts=counts,
        elapsed_s=time.monotonic() - started,
        rests_on="acks_late + reject_on_worker_lost + visibility timeout (redelivery); "
        "done-marker and outbox in Redis, backend status check (no 2nd write); "
        "a coalesced call shares only the serve call, each job keeps its own ack",
        extra=calls,
    )
    assert_exactly_once(admin, jobs, counts)
    assert calls["jobs_in_calls"] > calls["serve_calls"], calls  # groups were in flight


def test_r2_serving_outage(
    admin: Any,
    worker_env: dict[str, str],
    example_app: Any,
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    from ray import serve

    from serve_runtime.deploy import deploy

    worker = start_workers(worker_env, fresh_redis.url, tmp_path / "worker.log", concurrency=32)
    jobs = make_jobs(admin, N, tag="r2")
    started = time.monotonic()
    producer = Producer(fresh_redis.url, fresh_redis.url)
    producer.send(jobs)
    try:
        wait_fraction_final(admin, jobs, 0.3, timeout=600)
        serve.delete(example_app.app_name)
        outage_end = time.monotonic() + 20
        wait_for(
            lambda: time.monotonic() > outage_end, timeout=30, interval=0.5, what="the 20 s outage"
        )
        deploy(EXAMPLE_PLUGIN)
        counts = wait_all_final(admin, jobs, timeout=900)
    finally:
        if example_app.app_name not in serve.status().applications:
            deploy(EXAMPLE_PLUGIN)
        worker.stop()
        producer.close()
    record(
        "R2 serving outage",
        load=f"{N} jobs, 32 threads",
        faults="Serve application deleted for 20 s at 30% done, then redeployed",
        counts=counts,
        elapsed_s=time.monotonic() - started,
        rests_on="404 from the proxy and 502/503/504 are transient: retried with "
        "exponential backoff + jitter (SYNAPSE_BRIDGE_RETRY_MAX/_BASE/_CAP) "
        "longer than the outage",
    )
    assert_exactly_once(admin, jobs, counts)


def test_r3_backend_faults(
    admin: Any,
    worker_env: dict[str, str],
    example_app: Any,
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    worker = start_workers(worker_env, fresh_redis.url, tmp_path / "worker.log", concurrency=32)
    jobs = make_jobs(admin, N, tag="r3")
    flaky = {
        "path_prefix": "jobs/",
        "methods": ["PATCH"],
        "error_rate": 0.2,
        "latency_ms": 200,
    }
    started = time.monotonic()
    producer = Producer(fresh_redis.url, fresh_redis.url)
    try:
        admin.set_faults([flaky], seed=7)
        producer.send(jobs)
        wait_fraction_final(admin, jobs, 0.3, timeout=600)
        admin.set_faults([{"path_prefix": "", "outage": True}, flaky], seed=7)
        outage_end = time.monotonic() + 10
        wait_for(
            lambda: time.monotonic() > outage_end,
            timeout=20,
            interval=0.5,
            what="the 10 s backend outage",
        )
        admin.set_faults([flaky], seed=7)
        wait_for(
            lambda: (c := wait_all_final(admin, jobs, timeout=0)).lost == 0 and c,
            timeout=900,
            interval=1,
            what="every job final with faults on",
        )
    finally:
        admin.clear_faults()
        worker.stop()
        producer.close()
    counts = wait_all_final(admin, jobs, timeout=60)
    record(
        "R3 backend faults",
        load=f"{N} jobs, 32 threads",
        faults="20% of PATCHes answer 500, the rest +200 ms; a 10 s full backend outage",
        counts=counts,
        elapsed_s=time.monotonic() - started,
        rests_on="final write recorded in the Redis outbox first (first result wins), "
        "delivered under a per-job lock, status checked before the PATCH; "
        "the flusher retries until delivered",
    )
    assert_exactly_once(admin, jobs, counts)


def test_r4_redis_restart(
    admin: Any,
    worker_env: dict[str, str],
    example_app: Any,
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    worker = start_workers(worker_env, fresh_redis.url, tmp_path / "worker.log")
    jobs = make_jobs(admin, N, tag="r4")
    started = time.monotonic()
    producer = Producer(fresh_redis.url, fresh_redis.url)
    producer.send(jobs)
    producer.close()
    try:
        wait_fraction_final(admin, jobs, 0.3, timeout=600)
        fresh_redis.stop()  # SIGTERM; with appendonly + appendfsync always nothing is lost
        fresh_redis.start()
        counts = wait_all_final(admin, jobs, timeout=900)
    finally:
        worker.stop()
    record(
        "R4 broker restart (Redis, AOF)",
        load=f"{N} jobs, 16 threads",
        faults="redis-server (broker, results, outbox) stopped and restarted at 30% done",
        counts=counts,
        elapsed_s=time.monotonic() - started,
        rests_on="AOF with appendfsync always; Celery reconnects (broker_connection_retry);"
        " redis-py retries commands over the restart; unacked messages restored",
    )
    assert_exactly_once(admin, jobs, counts)


def test_r4_redis_restarted_again_and_again(
    admin: Any,
    worker_env: dict[str, str],
    example_app: Any,
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    """Eight restarts, each once the worker has made progress since the last, half of
    them SIGKILL. One restart seldom meets the worker's unluckiest moment (its channel
    waiting in BRPOP as Redis goes); this met it within 6 restarts before the transport
    kept its address (tests/test_redis_transport.py), and the worker stopped consuming."""
    worker = start_workers(worker_env, fresh_redis.url, tmp_path / "worker.log")
    jobs = make_jobs(admin, N, tag="r4x")
    started = time.monotonic()
    producer = Producer(fresh_redis.url, fresh_redis.url)
    producer.send(jobs)
    producer.close()
    restarts = 0
    try:
        for i in range(8):
            done = count(admin, jobs)
            # After the first, a restart waits for 60 more final jobs: proof that the
            # worker consumes again; a worker that stopped fails here, naming the restart.
            target = (done.succeeded + done.failed + (60 if i else 200)) / len(jobs)
            try:
                wait_fraction_final(admin, jobs, target, timeout=180)
            except AssertionError as e:
                raise AssertionError(f"no progress after restart {i}: {e}") from None
            if i % 2:
                fresh_redis.kill()
            else:
                fresh_redis.stop()
            fresh_redis.start()
            restarts += 1
        counts = wait_all_final(admin, jobs, timeout=600)
    finally:
        worker.stop()
    record(
        "R4 broker restarted 8 times (Redis, AOF)",
        load=f"{N} jobs, 16 threads",
        faults="redis-server stopped (SIGTERM) or killed (SIGKILL) and restarted 8 times,"
        " each after the worker had finished 60 more jobs",
        counts=counts,
        elapsed_s=time.monotonic() - started,
        rests_on="as R4, and the transport keeps its broker address after Celery collects"
        " the connection, so unacked messages are put back and the consumer reconnects",
        extra={"restarts": restarts},
    )
    assert_exactly_once(admin, jobs, counts)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def test_r4_rabbitmq_restart(
    admin: Any,
    worker_env: dict[str, str],
    example_app: Any,
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    from tests.test_worker import RABBIT_URL, _rabbit_reachable

    if not _rabbit_reachable() or shutil.which("rabbitmqctl") is None:
        pytest.skip("no local RabbitMQ with rabbitmqctl to restart")
    worker = start_workers(
        worker_env, fresh_redis.url, tmp_path / "worker.log", broker_url=RABBIT_URL
    )
    producer = Producer(RABBIT_URL, fresh_redis.url)
    producer.app.control.purge()  # leftovers of earlier runs on the shared broker
    jobs = make_jobs(admin, N, tag="r4q")
    started = time.monotonic()
    producer.send(jobs)
    producer.close()
    try:
        wait_fraction_final(admin, jobs, 0.3, timeout=600)
        _rabbitmqctl("stop_app")
        _rabbitmqctl("start_app")
        counts = wait_all_final(admin, jobs, timeout=900)
    finally:
        worker.stop()
    record(
        "R4 broker restart (RabbitMQ)",
        load=f"{N} jobs, 16 threads",
        faults="RabbitMQ application stopped and started at 30% done",
        counts=counts,
        elapsed_s=time.monotonic() - started,
        rests_on="durable queues, persistent messages, late acks (unacked messages "
        "requeued when the channel dies); outbox and done-markers in Redis",
    )
    assert_exactly_once(admin, jobs, counts)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_load_burst_of_10000_jobs(
    admin: Any,
    worker_env: dict[str, str],
    example_app: Any,
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    n = 10_000
    port = free_port("127.0.0.1")
    worker = start_workers(
        worker_env,
        fresh_redis.url,
        tmp_path / "worker.log",
        concurrency=16,
        SYNAPSE_BRIDGE_METRICS_PORT=str(port),
    )
    jobs = make_jobs(admin, n, tag="load")
    started = time.monotonic()
    producer = Producer(fresh_redis.url, fresh_redis.url)
    producer.send(jobs)
    producer.close()
    samples: list[int] = []
    try:

        def sample_and_check() -> Counts | None:
            samples.append(_rss_kb(worker.proc.pid))
            c = wait_all_final(admin, jobs, timeout=0)
            return c if c.lost == 0 else None

        counts = wait_for(
            sample_and_check, timeout=1500, interval=2, what="the 10,000-job burst drained"
        )
        calls = coalesced_calls(port)
    finally:
        worker.stop()
    peak_mb = max(samples) / 1024
    warm = samples[len(samples) // 10] / 1024
    final = samples[-1] / 1024
    record(
        "Load: 10,000-job burst",
        load=f"{n} jobs queued at once, 16 threads",
        faults="none (memory under a deep queue)",
        counts=counts,
        elapsed_s=time.monotonic() - started,
        rests_on="prefetch multiplier 1 (the worker holds at most its slots), "
        "one pooled HTTP client per process",
        extra={
            "worker_rss_peak_mb": round(peak_mb, 1),
            "worker_rss_after_warmup_mb": round(warm, 1),
            "worker_rss_final_mb": round(final, 1),
            **calls,
        },
    )
    assert_exactly_once(admin, jobs, counts)
    assert peak_mb < 400, f"worker RSS peaked at {peak_mb:.0f} MB"
    assert final <= warm * 1.25 + 10, f"RSS grew from {warm:.0f} MB to {final:.0f} MB"
