"""The bridge's HTTP clients keep no cookies.

Each is shared by every caller: the worker's backend client and serve client (one per
process, all tenants), the replica's backend client (one per replica, all callers). A
cookie kept from one caller's answer would go out with the next caller's request: a
session cookie the backend sets for Alice's token would travel with Bob's request,
where a backend that accepts sessions would take Bob for Alice.

A small real HTTP server sets a cookie on every answer and records the ``Cookie``
header of every request it is sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from config import Settings
from serve_runtime.backend_client import BackendClient
from serve_runtime.client import ServeClient
from worker.backend_api import BackendAPI

SERVICE = "tok-service-0123456789abcdef"


@dataclass
class CookieSetter:
    url: str = ""
    cookies: list[str | None] = field(default_factory=list)  # each request's Cookie header


@pytest.fixture
def server() -> Iterator[CookieSetter]:
    seen = CookieSetter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real servers answer

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen.cookies.append(self.headers.get("Cookie"))
            body = json.dumps({"id": "job-1", "status": "RUNNING", "file": None}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", f"sessionid=caller-{len(seen.cookies)}; Path=/")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    seen.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield seen
    httpd.shutdown()
    httpd.server_close()


def test_the_workers_backend_client_keeps_no_cookie(server: CookieSetter) -> None:
    api = BackendAPI(Settings(access_token=SERVICE), base_url=server.url)
    try:
        api.get_job("job-1", tenant="acme")
        api.patch_job("job-1", {"status": "SUCCEEDED"}, tenant="globex")
        api.get_job("job-1", tenant="globex")
    finally:
        api.close()
    assert server.cookies == [None, None, None]


def test_the_workers_serve_client_keeps_no_cookie(server: CookieSetter) -> None:
    client = ServeClient(Settings(serve_ack_timeout_s=0), base_url=server.url)
    try:
        for token in ("tok-alice", "tok-bob"):
            client.infer("/app", {"x": 1}, model=1, token=token, backend_url="http://b")
    finally:
        client.close()
    assert server.cookies == [None, None]


def test_the_replicas_backend_client_keeps_no_cookie(server: CookieSetter) -> None:
    async def two_callers() -> None:
        client = BackendClient(server.url)
        try:
            await client.get_model("12", "tok-alice", "acme")
            await client.get_model("12", "tok-bob", "globex")
        finally:
            await client.aclose()

    asyncio.run(two_callers())
    assert server.cookies == [None, None]
