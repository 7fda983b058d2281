"""The sharded transport behaves like one httpx client (issue 13).

Against a real HTTP/1.1 keep-alive server in a thread that counts the connections it
holds open and the requests in flight, and can hold requests until released.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpcore
import httpx
import pytest

from config.settings import Settings
from serve_runtime.client import ServeClient
from serve_runtime.errors import ServeTimeout
from serve_runtime.http_pool import (
    SHARD_CONNECTIONS,
    ShardedConnectionPool,
    ShardedTransport,
    shard_sizes,
)
from tests.conftest import wait_for
from worker import backend_api as api


class Server:
    """Answers ``{"path", "body"}``; ``/hold`` waits for ``release``, ``/slow`` 1 s."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0  # connections held open now
        self.max_open = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.open += 1
                    server.max_open = max(server.max_open, server.open)

            def finish(self) -> None:
                with server.lock:
                    server.open -= 1
                super().finish()

            def log_message(self, *args: Any) -> None:
                pass

            def answer(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(size) if size else b""
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path.startswith("/hold"):
                        server.gate.wait(30)
                    elif self.path.startswith("/slow"):
                        time.sleep(1.0)
                    data = json.dumps({"path": self.path, "body": body.decode()}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client went away (its read timeout)
                    self.close_connection = True
                finally:
                    with server.lock:
                        server.in_flight -= 1

            do_GET = do_POST = do_PATCH = answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def client(total: int, per_shard: int, **timeout: float) -> httpx.Client:
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    return httpx.Client(
        timeout=httpx.Timeout(10.0, **timeout),
        transport=ShardedTransport(limits, per_shard=per_shard),
    )


def pool_of(c: httpx.Client) -> ShardedConnectionPool:
    transport = c._transport
    assert isinstance(transport, ShardedTransport)
    return transport.pool


def all_free(pool: ShardedConnectionPool) -> bool:
    return pool._free == pool.sizes


def test_shard_sizes_are_the_fewest_near_equal_parts() -> None:
    assert shard_sizes(100, 16) == [15, 15, 14, 14, 14, 14, 14]
    assert shard_sizes(16, 16) == [16]
    assert shard_sizes(17, 16) == [9, 8]
    assert shard_sizes(1, 16) == [1]
    for total in range(1, 300):
        sizes = shard_sizes(total, 16)
        assert sum(sizes) == total and max(sizes) <= 16 and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-total // 16)
    assert shard_sizes(100) == [8] * 9 + [7] * 4  # the default: at most SHARD_CONNECTIONS
    with pytest.raises(ValueError):
        shard_sizes(0)


def test_many_threads_every_response_read_and_connections_bounded(server: Server) -> None:
    c = client(10, 4)
    assert pool_of(c).sizes == [4, 3, 3]

    def call(i: int) -> None:
        for j in range(15):
            r = c.post(f"{server.url}/echo/{i}/{j}", content=f"{i}-{j}")
            assert r.status_code == 200
            assert r.json() == {"path": f"/echo/{i}/{j}", "body": f"{i}-{j}"}

    with ThreadPoolExecutor(48) as ex:
        list(ex.map(call, range(48)))
    assert 1 <= server.max_open <= 10
    assert server.max_in_flight <= 10
    assert all_free(pool_of(c))  # every slot given back
    c.close()


def test_all_connections_usable_across_shards_and_no_more(server: Server) -> None:
    c = client(5, 2)  # shards of 2, 2, 1
    with ThreadPoolExecutor(5) as ex:
        held = [ex.submit(c.get, f"{server.url}/hold/{i}") for i in range(5)]
        # All five run at once, though no shard holds more than two.
        wait_for(lambda: server.in_flight == 5, 10, what="5 requests in flight")
        start = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):  # a sixth waits for a slot, then gives up
            c.get(f"{server.url}/echo", timeout=httpx.Timeout(10.0, pool=0.3))
        assert 0.25 <= time.monotonic() - start < 5
        server.gate.set()
        assert all(f.result(10).status_code == 200 for f in held)
    assert server.max_open == 5 and server.max_in_flight == 5
    assert all_free(pool_of(c))
    assert c.get(f"{server.url}/echo").status_code == 200
    c.close()


def test_a_waiting_request_gets_the_first_slot_freed(server: Server) -> None:
    c = client(2, 1)
    with ThreadPoolExecutor(3) as ex:
        held = [ex.submit(c.get, f"{server.url}/hold/{i}") for i in range(2)]
        wait_for(lambda: server.in_flight == 2, 10, what="2 requests in flight")
        waiting = ex.submit(c.get, f"{server.url}/echo/late")
        server.gate.set()
        assert waiting.result(10).json()["path"] == "/echo/late"
        assert all(f.result(10).status_code == 200 for f in held)
    assert server.max_open == 2
    c.close()


def test_read_timeout_raises_and_gives_the_slot_back(server: Server) -> None:
    c = client(2, 1)
    for _ in range(3):  # more timeouts than slots: none is kept
        with pytest.raises(httpx.ReadTimeout):
            c.get(f"{server.url}/slow", timeout=httpx.Timeout(10.0, read=0.2))
    assert all_free(pool_of(c))
    assert c.get(f"{server.url}/echo").status_code == 200
    c.close()


def test_connection_errors_give_the_slot_back() -> None:
    dead = Server()
    url = dead.url
    dead.close()  # nothing listens there now
    c = client(2, 1)
    for _ in range(5):
        with pytest.raises(httpx.ConnectError):
            c.get(f"{url}/echo")
    assert all_free(pool_of(c))
    c.close()


def test_a_streamed_response_closed_unread_gives_the_slot_back(server: Server) -> None:
    c = client(1, 1)
    for _ in range(3):
        with c.stream("GET", f"{server.url}/echo") as r:
            assert r.status_code == 200  # the body is never read
    assert all_free(pool_of(c))
    assert c.get(f"{server.url}/echo").json()["path"] == "/echo"
    c.close()


def test_close_closes_every_shards_connections(server: Server) -> None:
    c = client(6, 2)
    with ThreadPoolExecutor(6) as ex:
        held = [ex.submit(c.get, f"{server.url}/hold/{i}") for i in range(6)]
        wait_for(lambda: server.in_flight == 6, 10, what="6 requests in flight")
        server.gate.set()
        assert all(f.result(10).status_code == 200 for f in held)
    assert server.open == 6  # kept alive, spread over the three shards
    assert all(len(shard.connections) == 2 for shard in pool_of(c).shards)
    c.close()
    wait_for(lambda: server.open == 0, 10, what="the server to see every connection closed")
    with pytest.raises(RuntimeError):
        c.get(f"{server.url}/echo")


def test_serve_client_keeps_its_limit_and_pool_timeout(server: Server) -> None:
    s = Settings(serve_max_connections=3, serve_connect_timeout_s=0.3, serve_read_timeout_s=10)
    sc = ServeClient(s, base_url=server.url)
    with ThreadPoolExecutor(3) as ex:
        held = [ex.submit(sc._http.get, f"{server.url}/hold/{i}") for i in range(3)]
        wait_for(lambda: server.in_flight == 3, 10, what="3 requests in flight")
        with pytest.raises(ServeTimeout):  # the pool timeout is the connect timeout
            sc.infer("/echo", {"x": 1}, model=1, token="t", backend_url="http://backend")
        server.gate.set()
        assert all(f.result(10).status_code == 200 for f in held)
    assert server.max_open == 3
    assert sc.infer("/echo", {"x": 1}, model=1, token="t", backend_url="http://b") == {
        "path": "/echo/",
        "body": '{"x":1}',
    }
    sc.close()


def test_backend_api_spreads_its_pool_over_shards_and_keeps_the_deadline() -> None:
    s = Settings(access_token="tok-service-0123456789abcdef", worker_concurrency=184)
    b = api.BackendAPI(s, base_url="http://127.0.0.1:9")
    pool = pool_of(b._http)
    assert sum(pool.sizes) == 192 and max(pool.sizes) <= SHARD_CONNECTIONS
    assert all(isinstance(sh._network_backend, api._DeadlineBackend) for sh in pool.shards)
    b.close()


def test_one_request_checks_few_connections_however_many_are_open(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defect: one pool of 100 connections checked ~100^2 states per request."""
    s = Settings(serve_max_connections=100)
    sc = ServeClient(s, base_url=server.url)
    with ThreadPoolExecutor(100) as ex:
        held = [ex.submit(sc._http.get, f"{server.url}/hold/{i}") for i in range(100)]
        wait_for(lambda: server.in_flight == 100, 20, what="100 requests in flight")
        server.gate.set()
        assert all(f.result(20).status_code == 200 for f in held)
    assert server.open == 100  # all kept alive, idle
    checks = [0]
    is_idle = httpcore.HTTPConnection.is_idle

    def counted(self: httpcore.HTTPConnection) -> bool:
        checks[0] += 1
        return is_idle(self)

    monkeypatch.setattr(httpcore.HTTPConnection, "is_idle", counted)
    assert sc._http.get(f"{server.url}/echo").status_code == 200
    # httpcore checks each idle connection against all of its pool's, twice per request:
    # a shard's count squared, not the client's (20,300 for one pool of 100).
    bound = 2 * SHARD_CONNECTIONS * (SHARD_CONNECTIONS + 2)
    assert checks[0] <= bound, f"{checks[0]} connection checks for one request"
    sc.close()
