"""Running the local backend: in this process (``run``) or as a managed subprocess
(``BackendProcess``, for tests and the demo).

A subprocess is what tests need to be honest: a real port, a real restart that reopens
the SQLite file, a real SIGKILL. ``BackendProcess`` starts ``python -m local_backend
serve`` on a free (or given) port, waits with a deadline until ``GET health/`` answers,
and keeps the port and data dir across ``restart()``. The server's output goes to
``<data_dir>/backend.log`` (appended, so a restart keeps the history). The admin token
travels in the environment, not on the command line (``ps`` shows command lines).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from local_backend import DEFAULT_ADMIN_TOKEN
from local_backend.client import AdminClient

LOG_FILE_NAME = "backend.log"
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def run(
    host: str = "127.0.0.1",
    port: int = 8010,
    data_dir: Path = Path(".local_backend"),
    admin_token: str = DEFAULT_ADMIN_TOKEN,
    public_url: str | None = None,
    faults: Any = None,
    log_level: str = "info",
) -> None:
    """Serve the backend with uvicorn until interrupted (blocking)."""
    import uvicorn

    from local_backend.app import create_app

    app = create_app(Path(data_dir), public_url=public_url, admin_token=admin_token, faults=faults)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackendProcess:
    """The backend as a subprocess; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        admin_token: str = DEFAULT_ADMIN_TOKEN,
        public_url: str | None = None,
        faults: Any = None,
        startup_timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.admin_token = admin_token
        self.public_url = public_url
        self.faults = faults
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:8123``."""
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE_NAME

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def admin(self, timeout: float = 10.0) -> AdminClient:
        """A new admin client for this backend (close it, or use it as a context manager)."""
        return AdminClient(self.url, self.admin_token, timeout=timeout)

    def start(self) -> BackendProcess:
        if self.running:
            raise RuntimeError("backend already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "local_backend",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        if self.public_url:
            cmd += ["--public-url", self.public_url]
        env = {**os.environ, **self.extra_env, "SYNAPSE_BACKEND_ADMIN_TOKEN": self.admin_token}
        env.pop("SYNAPSE_BACKEND_FAULTS", None)
        if self.faults is not None:
            env["SYNAPSE_BACKEND_FAULTS"] = json.dumps(self.faults)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p
        )
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- start {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``GET health/`` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"backend exited during start:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health/").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"backend not ready at {self.url}:\n{self.log_tail()}")
                time.sleep(0.05)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crash would; committed data stays on disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def restart(self) -> BackendProcess:
        """Stop, then start again on the same port with the same data dir."""
        self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
