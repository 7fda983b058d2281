"""The serve image's Python layer, built and run without a Docker engine (issue 14).

docker/Dockerfile.serve starts from ``rayproject/ray:<the pinned Ray>`` and runs ``pip
install "/app[serve]"`` over what it copies. Here the base image is the pinned
``ray[serve]`` in a clean virtual environment, and the layer is that same install of a
build context holding exactly what the Dockerfile copies (tests/image_layer.py). From
that environment, outside the repository, the image's command runs: ``ray start
--head``, then ``synapse-bridge serve deploy /app/examples/classifier --block``; its
health check's URL must answer, and a job goes end to end through it (a worker of this
checkout, its own Redis, the session's local backend).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import Settings
from devtools.ray_node import start_node, stop_group
from devtools.redis_server import RedisServer
from local_backend.server import free_port
from tests.conftest import ROOT, WorkerProcess, wait_for
from tests.image_layer import build_context, cli_commands, new_venv, pip_install
from tests.test_docker import DOCKERFILES, parse_dockerfile, ray_version
from tests.test_worker import new_job, send, wait_final
from worker.app import create_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Layer:
    venv: Path
    app: Path  # the image's /app: the build context, PYTHONPATH

    def env(self, **extra: str) -> dict[str, str]:
        """The image's environment: its ENV lines with /app here, nothing of ours."""
        image_env = parse_dockerfile(DOCKERFILES["serve"]).env
        env = {k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR") if k in os.environ}
        env.update({k: v.replace("/app", str(self.app)) for k, v in image_env.items()})
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
        return {**env, **extra}

    def run(self, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            cwd=self.app,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    root = tmp_path_factory.mktemp("serve-image")
    app = root / "app"
    sources = build_context("serve", app)
    assert {"serve_runtime", "examples", "docker/serve_app.py"} <= set(sources)
    venv = new_venv(root / "venv")
    # The base image: Ray at the version pyproject pins, with Serve.
    pip_install(venv, f"ray[serve]=={ray_version()}", cwd=root)
    # The Dockerfile's layer: `pip install --no-cache-dir "/app[serve]"`, Ray kept.
    pip_install(venv, "--no-cache-dir", f"{app}[serve]", cwd=root)
    return Layer(venv, app)


def test_the_layer_has_every_command_and_the_builder_kuberay_imports(
    layer: Layer, backend: Any
) -> None:
    shown = layer.run("synapse-bridge", "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert cli_commands(shown.stdout) == {
        "worker",
        "intake",
        "serve",
        "backend",
        "demo",
        "submit",
    }
    # serveConfigV2's import path, `serve_app:build_app`, from /app on PYTHONPATH.
    code = (
        "import ray, serve_app, serve_runtime\n"
        "app = serve_app.build_app(serve_app.BuildArgs())\n"
        "print(ray.__version__, type(app).__name__, serve_runtime.__file__)\n"
    )
    built = layer.run(
        "python",
        "-c",
        code.replace(
            "BuildArgs()", f"BuildArgs(plugin_dir={str(layer.app / 'examples/classifier')!r})"
        ),
        SYNAPSE_HOST=backend.url,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    version, kind, runtime_file = built.stdout.split()
    assert (version, kind) == (ray_version(), "Application")
    assert not Path(runtime_file).is_relative_to(ROOT)


@pytest.fixture
def layer_serve(layer: Layer, backend: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The image's command, from the layer: a Ray head, then our deploy command."""
    gcs_port, serve_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    # Short: Ray's socket paths under it must stay below the 107-byte limit.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = layer.env(
        SYNAPSE_HOST=backend.url,
        SYNAPSE_BRIDGE_SERVE_HOST="127.0.0.1",
        SYNAPSE_BRIDGE_SERVE_PORT=str(serve_port),
        SYNAPSE_BRIDGE_MODEL_DIR=str(tmp_path / "models"),
        # Loopback only, as in bench/two_nodes.py; a real cluster keeps it on.
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=str(ray_tmpdir),
    )
    head = start_node(
        [
            "--head",
            f"--port={gcs_port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
        ],
        tmp_path / "ray-head.log",
        ray_tmpdir,
        ray=str(layer.venv / "bin" / "ray"),
        env=env,
    )
    deploy_log = tmp_path / "deploy.log"
    deploy = subprocess.Popen(
        [
            "synapse-bridge",
            "serve",
            "deploy",
            str(layer.app / "examples" / "classifier"),
            "--block",
        ],
        cwd=layer.app,
        env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
        stdout=deploy_log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{serve_port}"
    try:
        wait_for(
            lambda: "ready at" in deploy_log.read_text() or deploy.poll() is not None,
            timeout=240,
            what="the layer's serve deploy",
        )
        assert deploy.poll() is None, deploy_log.read_text()[-3000:]
        yield url, ray_tmpdir / "ray" / "session_latest" / "logs"
    finally:
        deploy.terminate()
        deploy.wait(30)
        stop_group(head)


def test_the_images_command_from_the_layer_serves_a_job_end_to_end(
    layer_serve: tuple[str, Path],
    worker_env: dict[str, str],
    admin: Any,
    tmp_path: Path,
) -> None:
    url, ray_logs = layer_serve
    # The image's HEALTHCHECK URL.
    assert httpx.get(f"{url}/-/healthz", timeout=5).status_code == 200
    redis = RedisServer(workdir=tmp_path / "redis").start()
    env = {**worker_env, "REDIS_URL": redis.url, "SYNAPSE_SERVE_URL": url}
    env.update(SYNAPSE_BRIDGE_METRICS_PORT="0")
    env.pop("BROKER_URL", None)
    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=2).start()
    try:
        job_id = new_job(admin)
        send(job_id, app=create_app(Settings(redis_url=redis.url)))
        job = wait_final(admin, job_id, timeout=120)
    finally:
        worker.stop()
        redis.close()
    assert job["status"] == "SUCCEEDED", job
    assert job["result"]["predictions"] == ["setosa", "virginica"]
    # Answered by the layer's replica (its Ray's logs), not by the session's Serve.
    replica_logs = [
        p.read_text(errors="replace")
        for p in (ray_logs / "serve").glob("replica_*.log")
        if "TicketStore" not in p.name
    ]
    assert any("-- POST " in text and " 200 " in text for text in replica_logs), replica_logs
