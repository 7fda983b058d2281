"""The demo's embedded parts: a seeded local backend, a local Ray with Serve.

Everything started here is stopped by ``DemoStack.close()``; nothing is assumed to be
running beforehand.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from config.settings import get_settings
from local_backend.client import AdminClient
from local_backend.server import BackendProcess, free_port

EXAMPLE_PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "classifier"
DEMO_PLUGINS = ("classifier", "digits")  # examples/<name>/demo.py says what the demo needs

DEMO_USERS = {
    "alice": ("demo-alice-token-0001", ["acme"]),
    "bob": ("demo-bob-token-0002", ["acme"]),
    "gina": ("demo-gina-token-0003", ["globex"]),
    "hugo": ("demo-hugo-token-0004", ["globex"]),
}
SERVICE_TOKEN = "demo-service-token-0000"
DEMO_MODELS = {1: "acme", 2: "acme", 3: "globex", 4: "globex"}


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


@dataclass
class DemoStack:
    workdir: Path
    backend: BackendProcess | None = None
    started_ray: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        if self.started_ray:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        if self.backend is not None:
            self.backend.stop()


def demo_plugin(name: str) -> ModuleType:
    """``examples.<name>.demo``: PLUGIN_DIR, RELEASE, ROWS, write_model_archive. Imported
    by name so the classifier's demo does not import PyTorch."""
    if name not in DEMO_PLUGINS:
        raise ValueError(f"no demo plugin {name!r}; one of {', '.join(DEMO_PLUGINS)}")
    return importlib.import_module(f"examples.{name}.demo")


def seed_backend(admin: AdminClient, workdir: Path, plugin: ModuleType) -> None:
    write_model_archive = plugin.write_model_archive
    models = []
    for model_id, tenant in DEMO_MODELS.items():
        archive = workdir / "archives" / f"model-{model_id}.tar.gz"
        if not archive.exists():
            write_model_archive(archive, seed=model_id, version=1)
        models.append(
            {
                "id": model_id,
                "name": f"{plugin.RELEASE['code']}-{model_id}",
                "tenant": tenant,
                "version": 1,
                "archive": str(archive),
            }
        )
    users: list[dict[str, Any]] = [
        {"name": name, "token": token, "tenants": tenants}
        for name, (token, tenants) in DEMO_USERS.items()
    ]
    users.append({"name": "bridge", "token": SERVICE_TOKEN, "service": True})
    admin.seed({"tenants": ["acme", "globex"], "users": users, "models": models})


@contextmanager
def demo_stack(
    workdir: Path,
    *,
    plugin: ModuleType | None = None,
    serve_port: int = 8100,
    num_cpus: int | None = None,
) -> Iterator[DemoStack]:
    """Start the backend and Ray Serve, set the environment the runtime reads, clean up."""
    workdir.mkdir(parents=True, exist_ok=True)
    stack = DemoStack(workdir=workdir)
    try:
        stack.backend = BackendProcess(workdir / "backend")
        stack.backend.start()
        with AdminClient(stack.backend.url) as admin:
            seed_backend(admin, workdir, plugin or demo_plugin("classifier"))
        if not port_free(serve_port):
            serve_port = free_port("127.0.0.1")
        os.environ.update(
            {
                "SYNAPSE_HOST": stack.backend.url,
                "SYNAPSE_ACCESS_TOKEN": SERVICE_TOKEN,
                "SYNAPSE_SERVE_URL": f"http://127.0.0.1:{serve_port}",
                "SYNAPSE_BRIDGE_SERVE_PORT": str(serve_port),
                "SYNAPSE_BRIDGE_MODEL_DIR": str(workdir / "models"),
            }
        )
        get_settings.cache_clear()
        import ray

        from serve_runtime.deploy import ensure_ray, ensure_serve

        started = time.perf_counter()
        stack.started_ray = not ray.is_initialized()
        ensure_ray(num_cpus=num_cpus)
        ensure_serve()
        stack.timings["ray_start_s"] = time.perf_counter() - started
        yield stack
    finally:
        stack.close()
