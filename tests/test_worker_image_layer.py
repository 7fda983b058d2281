"""The worker image's Python layer, built and run without a Docker engine (issue 14).

No Docker engine runs here and base images cannot be pulled, so the layer is rebuilt as
docker/Dockerfile.worker builds it (tests/image_layer.py): ``pip install -r
docker/worker-requirements.txt``, then ``pip install --no-deps .``. The worker is started
from that environment, outside the repository (nothing of the checkout on its path),
against its own Redis, and runs a job end to end through real Ray Serve and the local
backend.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from devtools.redis_server import RedisServer
from tests.conftest import ROOT, WorkerProcess
from tests.image_layer import build_context, cli_commands, new_venv, pip_install
from tests.test_worker import new_job, send, wait_final
from worker.app import create_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LACKS = ("ray", "fastapi", "starlette", "uvicorn", "numpy", "local_backend", "devtools", "examples")


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's /opt/venv, built from exactly what the Dockerfile copies."""
    root = tmp_path_factory.mktemp("worker-image")
    context = root / "src"
    sources = build_context("worker", context)
    assert "docker/worker-requirements.txt" in sources and "worker" in sources
    venv = new_venv(root / "venv")
    pip_install(venv, "--no-cache-dir", "-r", "worker-requirements.txt", cwd=context)
    pip_install(venv, "--no-cache-dir", "--no-deps", ".", cwd=context)
    return venv


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path / "redis").start()
    yield server
    server.close()


def test_the_layer_holds_the_worker_and_nothing_it_leaves_out(image_venv: Path) -> None:
    code = (
        "import importlib.util, sys\n"
        f"missing = [m for m in {LACKS!r} if importlib.util.find_spec(m)]\n"
        "import worker.cli, worker.tasks, worker.lifecycle, serve_runtime.client\n"
        "print(','.join(missing))\n"
    )
    run = subprocess.run(
        [str(image_venv / "bin" / "python"), "-c", code],
        cwd=image_venv,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "", f"the worker image would hold: {run.stdout.strip()}"


def test_the_layers_cli_offers_what_it_can_run(image_venv: Path) -> None:
    """No `serve` (no Ray here) nor dev commands; naming `serve` says what to install."""
    program = str(image_venv / "bin" / "synapse-bridge")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    shown = subprocess.run(
        [program, "--help"], cwd=image_venv, env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert cli_commands(shown.stdout) == {"worker", "intake"}, shown.stdout
    named = subprocess.run(
        [program, "serve", "status"],
        cwd=image_venv,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert named.returncode == 2, named.stderr[-2000:]
    assert "needs the Python package 'ray'" in named.stderr
    assert "pip install 'synapse-serve-bridge[serve]'" in named.stderr


def test_a_worker_from_the_layer_runs_a_job_end_to_end(
    image_venv: Path,
    worker_env: dict[str, str],
    example_app: Any,
    admin: Any,
    own_redis: RedisServer,
    tmp_path: Path,
) -> None:
    env = {**worker_env, "REDIS_URL": own_redis.url, "SYNAPSE_BRIDGE_METRICS_PORT": "0"}
    env.pop("BROKER_URL", None)
    env["PATH"] = f"{image_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    worker = WorkerProcess(
        env,
        tmp_path / "worker.log",
        concurrency=2,
        program=[str(image_venv / "bin" / "synapse-bridge")],
        cwd=image_venv,
    ).start()
    try:
        job_id = new_job(admin)
        send(job_id, app=create_app(Settings(redis_url=own_redis.url)))
        job = wait_final(admin, job_id, timeout=120)
    finally:
        worker.stop()
    assert job["status"] == "SUCCEEDED", job
    assert job["result"]["predictions"] == ["setosa", "virginica"]
    log = (tmp_path / "worker.log").read_text()
    assert str(image_venv) in log  # Celery's banner names the layer's packages, not ours
    assert str(ROOT / "worker") not in log
