"""Shared fixtures: one local backend, one Ray cluster with Serve, per test session.

Everything is real: the backend is a subprocess over HTTP with SQLite on disk, Ray runs
locally on the CPU, Serve listens on a free port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.classifier.model import write_model_archive
from examples.digits.make_model import write_model_archive as write_digits_archive
from local_backend.client import AdminClient
from local_backend.server import BackendProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = ROOT / "examples" / "classifier"
PROBE_PLUGIN = ROOT / "tests" / "plugins" / "probe"
DIGITS_PLUGIN = ROOT / "examples" / "digits"
DIGITS_MODEL = 40  # the PyTorch example's model (examples.digits)

TOKENS = {
    "alice": "tok-alice-0123456789",
    "bob": "tok-bob-0123456789",
    "carol": "tok-carol-0123456789",
    "eve": "tok-eve-0123456789",
    "service": "tok-service-0123456789",
}


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Wait for a condition with a deadline; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def model_archives(session_dir: Path) -> dict[int, Path]:
    out = {}
    for model_id, seed in {
        12: 0,
        13: 1,
        14: 2,
        15: 3,
        16: 4,
        18: 8,
        19: 9,
        21: 5,
        22: 6,
        23: 7,
        24: 10,
        25: 11,
        26: 12,
        27: 13,
        28: 14,
        29: 15,
        30: 16,
    }.items():
        path = session_dir / "archives" / f"model-{model_id}.tar.gz"
        write_model_archive(path, seed=seed, version=1)
        out[model_id] = path
    out[DIGITS_MODEL] = session_dir / "archives" / f"model-{DIGITS_MODEL}.tar.gz"
    write_digits_archive(out[DIGITS_MODEL], seed=0, version=1)
    return out


def seed_spec(archives: dict[int, Path]) -> dict[str, Any]:
    def model(mid: int, tenant: str = "acme", **kw: Any) -> dict[str, Any]:
        return {
            "id": mid,
            "name": kw.pop("name", f"model-{mid}"),
            "tenant": tenant,
            "version": 1,
            "archive": str(archives[mid]),
            **kw,
        }

    return {
        "tenants": ["acme", "globex"],
        "users": [
            {"name": "alice", "token": TOKENS["alice"], "tenants": ["acme"]},
            {"name": "bob", "token": TOKENS["bob"], "tenants": ["acme"]},
            {"name": "carol", "token": TOKENS["carol"], "tenants": ["acme"]},
            {"name": "eve", "token": TOKENS["eve"], "tenants": ["globex"]},
            {"name": "service", "token": TOKENS["service"], "service": True},
        ],
        "models": [
            model(12),
            model(13, grants=["alice"]),
            model(14),
            model(15),
            model(16, tenant="globex"),
            model(18),  # used by one test only: its first load is counted
            model(19),  # likewise
            {"id": 17, "name": "no-file", "tenant": "acme", "version": 1},
            model(21),
            model(22),
            model(23),
            # issue 12's model store tests, each model for one test
            model(24, checksum="sha256:" + "0" * 64),  # its archive fails the checksum
            model(25),  # republished as version 2 by a test
            model(26, name="slow-load"),  # the probe's loader takes 3 s
            model(27, name="broken-loader"),  # the probe's loader raises
            model(28),
            model(29),
            model(30),  # republished with the same version, new bytes
            model(DIGITS_MODEL, name="digits"),  # the PyTorch example (tests/test_digits.py)
        ],
    }


@pytest.fixture(scope="session")
def backend(session_dir: Path, model_archives: dict[int, Path]) -> Iterator[BackendProcess]:
    proc = BackendProcess(session_dir / "backend")
    proc.start()
    with AdminClient(proc.url) as admin:
        admin.seed(seed_spec(model_archives))
    yield proc
    proc.stop()


@pytest.fixture
def admin(backend: BackendProcess) -> Iterator[AdminClient]:
    with AdminClient(backend.url) as client:
        yield client


@pytest.fixture(scope="session")
def serve_env(session_dir: Path, backend: BackendProcess) -> Iterator[dict[str, str]]:
    """The environment every process of the session sees (replicas get it too)."""
    port = free_port("127.0.0.1")
    env = {
        "SYNAPSE_HOST": backend.url,
        "SYNAPSE_SERVE_URL": f"http://127.0.0.1:{port}",
        "SYNAPSE_BRIDGE_SERVE_PORT": str(port),
        "SYNAPSE_BRIDGE_MODEL_DIR": str(session_dir / "models"),
        "SYNAPSE_BRIDGE_AUTH_CACHE_TTL": "2",
        "SYNAPSE_BRIDGE_DEFERRED_POLL_INTERVAL": "0.1",
        "SYNAPSE_TEST_EVENTS_DIR": str(session_dir),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from config.settings import get_settings
    from serve_runtime.client import reset_default_client

    get_settings.cache_clear()
    reset_default_client()
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()
    reset_default_client()


@pytest.fixture(scope="session")
def ray_serve(serve_env: dict[str, str]) -> Iterator[None]:
    """One local Ray cluster with Serve for the whole session."""
    import ray
    from ray import serve

    from serve_runtime.deploy import ensure_ray, ensure_serve

    ensure_ray(num_cpus=4)
    ensure_serve()
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def example_app(ray_serve: None) -> Any:
    from serve_runtime.deploy import deploy

    return deploy(EXAMPLE_PLUGIN)


@pytest.fixture(scope="session")
def probe_app(ray_serve: None) -> Any:
    from serve_runtime.deploy import deploy

    return deploy(PROBE_PLUGIN)


# Two replicas of the probe plugin: polls and loads that land on either one.
PROBE_PAIR_PREFIX = "/probepair"  # the route of jobs whose release checksum is "probepair"


@pytest.fixture(scope="session")
def probe_pair_app(ray_serve: None) -> Any:
    from serve_runtime.deploy import deploy

    return deploy(
        PROBE_PLUGIN,
        overrides={"num_replicas": 2},
        app_name="probe-pair",
        route_prefix=PROBE_PAIR_PREFIX,
    )


# --- the worker tier: Redis, a worker process


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set and reachable, else a throwaway redis-server for the session."""
    from devtools.redis_server import ensure_redis

    url, server = ensure_redis(os.environ.get("REDIS_URL"))
    yield url
    if server is not None:
        server.close()


@pytest.fixture(scope="session")
def worker_env(serve_env: dict[str, str], redis_url: str, session_dir: Path) -> dict[str, str]:
    """The environment of worker processes and of in-process producers."""
    env = {
        **serve_env,
        "REDIS_URL": redis_url,
        "SYNAPSE_ACCESS_TOKEN": TOKENS["service"],
        # One sealing key for every producer and worker of the session: the CLI tests
        # submit with a user's token as their access token (no shared derived key).
        "SYNAPSE_BRIDGE_SEALING_KEY": "Xixvx7dedZpoijV7G-vKTu0ZuWMqVoC5i06xp6M7Dj8=",
        "SYNAPSE_BRIDGE_RETRY_BASE": "0.2",
        "SYNAPSE_BRIDGE_RETRY_CAP": "1",
        "SYNAPSE_BRIDGE_RETRY_MAX": "4",
        "SYNAPSE_BRIDGE_OUTBOX_FLUSH_INTERVAL": "0.5",
        "SYNAPSE_BRIDGE_PROGRESS_INTERVAL": "0.2",
        "SYNAPSE_BRIDGE_BATCH_CHUNK_SIZE": "4",
        "SYNAPSE_BRIDGE_LOG_FORMAT": "json",
        "SYNAPSE_BRIDGE_STORE_RESULTS": "true",  # tests read task outcomes
        "SYNAPSE_BRIDGE_TASK_EVENTS": "true",  # so the secrets scan covers events too
        # Every job marked RUNNING at its start: the tests count that write as "it ran".
        "SYNAPSE_BRIDGE_RUNNING_MARK_AFTER": "0",
        "SYNAPSE_BRIDGE_METRICS_PORT": str(free_port("127.0.0.1")),
    }
    os.environ.update(env)
    _reset_process_singletons()
    return env


def _reset_process_singletons() -> None:
    from serve_runtime.client import reset_default_client
    from worker.services import reset_services

    reset_services()
    reset_default_client()


class WorkerProcess:
    """``synapse-bridge worker`` as a real subprocess; its JSON log is kept for scans."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 8,
        *,
        program: list[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.concurrency = concurrency
        self.program = program or [sys.executable, "-m", "worker.cli"]  # then "worker -c N"
        self.cwd = cwd
        self.proc: Any = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        ready = self.log_path.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [*self.program, "worker", "-c", str(self.concurrency)],
            env={**self.env, "SYNAPSE_BRIDGE_READY_FILE": str(ready)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(self.cwd),
        )
        wait_for(
            lambda: ready.exists() or self.proc.poll() is not None,
            timeout=90,
            what="worker ready",
        )
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="session")
def worker_proc(
    worker_env: dict[str, str], example_app: Any, probe_app: Any, session_dir: Path
) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(worker_env, session_dir / "worker.log").start()
    yield proc
    proc.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the security module last: its secret scan then reads the whole run's logs."""
    items.sort(key=lambda item: item.module.__name__.endswith("test_security"))
