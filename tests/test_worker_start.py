"""A worker that cannot set itself up stops at start, names the setting, loses nothing.

Celery swallows an exception in a ``worker_ready`` handler (it logs it and goes on),
so a worker missing a setting used to log the error and keep consuming: no outbox
delivery, no ledger sweep, no ready file, and every job it took failed on the same
missing setting. These start a real worker against its own Redis with one message
queued before it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from config import Settings
from devtools.redis_server import RedisServer
from worker.app import create_app

# Nothing of a test session's settings: only what each case sets.
_CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("SYNAPSE_", "RAY_"))}


_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # as in the worker image: `import ray` fails
from worker.cli import main
sys.argv = ["synapse-bridge", "worker", "-c", "2"]
main()
"""


@pytest.fixture
def queued(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis with one job message in the ``inference`` queue."""
    server = RedisServer(workdir=tmp_path / "redis").start()
    create_app(Settings(redis_url=server.url)).send_task(
        "synapse.inference.run", kwargs={"job": {"job_id": "j-1"}}, queue="inference"
    )
    yield server
    server.close()


def _run_worker(program: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    with log.open("wb") as out:
        proc = subprocess.Popen(program, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = proc.wait(timeout=90)
        finally:
            proc.kill()
            proc.wait(10)
    return status, log.read_text()


def _still_queued(server: RedisServer) -> int:
    r = redis.Redis.from_url(server.url)
    try:
        return int(r.llen("inference"))
    finally:
        r.close()


@pytest.mark.parametrize(
    ("case", "extra", "program", "named"),
    [
        (
            "no backend URL",
            {},
            [sys.executable, "-m", "worker.cli", "worker", "-c", "2"],
            "set SYNAPSE_PLUGIN_RUN_HOST or SYNAPSE_HOST",
        ),
        (
            "a malformed sealing key",
            {"SYNAPSE_HOST": "http://127.0.0.1:9", "SYNAPSE_BRIDGE_SEALING_KEY": "sealing-secret"},
            [sys.executable, "-m", "worker.cli", "worker", "-c", "2"],
            "SYNAPSE_BRIDGE_SEALING_KEY",
        ),
        (
            "the handle transport without Ray",
            {"SYNAPSE_HOST": "http://127.0.0.1:9", "SYNAPSE_BRIDGE_SERVE_TRANSPORT": "handle"},
            [sys.executable, "-c", _WITHOUT_RAY],
            "SYNAPSE_BRIDGE_SERVE_TRANSPORT=handle needs the Python package 'ray'",
        ),
    ],
)
def test_a_worker_that_cannot_start_exits_naming_the_setting_and_leaves_the_job_queued(
    queued: RedisServer,
    tmp_path: Path,
    case: str,
    extra: dict[str, str],
    program: list[str],
    named: str,
) -> None:
    env = {
        **_CLEAN,
        "REDIS_URL": queued.url,
        "SYNAPSE_ACCESS_TOKEN": "svc-token-for-sealing",
        "SYNAPSE_BRIDGE_METRICS_PORT": "0",
        "SYNAPSE_BRIDGE_READY_FILE": str(tmp_path / "ready"),
        **extra,
    }
    status, log = _run_worker(program, env, tmp_path / "worker.log")
    assert status == 1, f"{case}: exit {status}\n{log[-3000:]}"
    assert named in log, log[-3000:]
    assert "svc-token-for-sealing" not in log and "sealing-secret" not in log
    assert not (tmp_path / "ready").exists()
    assert _still_queued(queued) == 1, f"{case}: the queued job left the queue\n{log[-2000:]}"
