"""A worker keeps consuming after its RabbitMQ restarts, whatever its threads were doing.

Celery (5.7) lowers a reconnected worker's prefetch count and raises it again from each
late ack. With the threads pool that ack runs in the task's thread, so several task
threads send ``basic_qos`` on the consumer's connection and each waits for the reply
on a socket the main loop also reads (py-amqp is not thread-safe). Replies are taken
by the wrong reader, every reader then blocks, and the worker runs nothing until the
broker drops it for missed heartbeats (about 180 s here; R4 in CI took 211 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.test_faults import _rabbitmqctl
from tests.test_worker import RABBIT_URL, _rabbit_reachable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOBS = 3000
RESTARTS = 3
RESUME_S = 30.0  # a reconnect takes about 3 s here; the stall lasted about 180 s


def _done(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _wait_done(path: Path, at_least: int, timeout: float, what: str, unique: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _done(path)
        if len(set(done) if unique else done) >= at_least:
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} (waited {timeout:.0f} s)")


@pytest.fixture
def restart_worker(tmp_path: Path) -> Iterator[tuple[Celery, Path, str]]:
    if not _rabbit_reachable() or shutil.which("rabbitmqctl") is None:
        pytest.skip("no local RabbitMQ with rabbitmqctl to restart")
    queue = f"restart-test-{uuid.uuid4().hex[:8]}"
    done_file = tmp_path / "done.txt"
    env = {
        **os.environ,
        "RESTART_TEST_QUEUE": queue,
        "RESTART_TEST_DONE_FILE": str(done_file),
        "RESTART_TEST_BROKER": RABBIT_URL,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: env[k] for k in env if k.startswith("RESTART_TEST_")})
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.amqp_restart_app", "worker",
         "-l", "info", "--concurrency", "16", "-Q", queue],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    producer = Celery(broker=RABBIT_URL)
    try:
        yield producer, done_file, queue
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        log.close()
        with producer.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        for k in env:
            if k.startswith("RESTART_TEST_"):
                os.environ.pop(k, None)


def test_a_worker_resumes_within_seconds_after_each_rabbitmq_restart(
    restart_worker: tuple[Celery, Path, str],
) -> None:
    producer, done_file, queue = restart_worker
    with producer.producer_or_acquire() as p:
        for i in range(JOBS):
            producer.send_task("restart_test.done", args=[i], queue=queue, producer=p)
    mark = 0
    for n in range(RESTARTS):
        mark += 300
        _wait_done(done_file, mark, 120, f"{mark} jobs done before restart {n}")
        _rabbitmqctl("stop_app")
        _rabbitmqctl("start_app")
        resumed_from = len(_done(done_file))
        _wait_done(
            done_file,
            resumed_from + 100,
            RESUME_S,
            f"the worker resumed after RabbitMQ restart {n} ({resumed_from} jobs done then)",
        )
        mark = len(_done(done_file))
    _wait_done(done_file, JOBS, 300, "every job ran", unique=True)
