"""A serve call the server never reads costs the receipt bound, not the read timeout (issue 13).

A small keep-alive HTTP/1.1 server on a real socket plays the proxy: it answers
``100 Continue`` to ``Expect`` like uvicorn does, and can be told to swallow the next
request that arrives on a reused connection (read it, never answer, keep the connection
open), which is what a stalled request looks like from the client.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpcore
import pytest

from config import Settings
from serve_runtime import ServeClient
from serve_runtime.receipt import ReceiptBackend, Unacknowledged

READ_TIMEOUT_S = 8.0  # what a lost request costs without the receipt
ACK_TIMEOUT_S = 0.3


class FakeProxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.acks = True  # answer Expect with 100 Continue
        self.swallow_reused = False  # swallow the next request on a reused connection
        self.delay_s = 0.0  # between the 100 Continue and the answer
        self.answered: list[Any] = []
        self.expects: list[str] = []  # each request's Expect header ("" without)
        self.swallowed: list[Any] = []
        self.release = threading.Event()  # lets swallowing handlers end at teardown


class Handler(socketserver.StreamRequestHandler):
    server: FakeProxy

    def handle(self) -> None:
        served = 0
        while True:
            line = self.rfile.readline()
            if not line:
                return
            headers: dict[str, str] = {}
            while (h := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = h.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = json.loads(self.rfile.read(int(headers.get("content-length", "0"))) or "null")
            self.server.expects.append(headers.get("expect", ""))
            if served and self.server.swallow_reused:
                self.server.swallow_reused = False
                self.server.swallowed.append(body)
                self.server.release.wait(60)
                return
            if self.server.acks and headers.get("expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wfile.flush()
            if self.server.delay_s:
                time.sleep(self.server.delay_s)  # the inference's time, server side
            out = json.dumps({"echo": body}).encode()
            self.server.answered.append(body)  # before the answer: the client may be quick
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(out), out)
            )
            self.wfile.flush()
            served += 1


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    server = FakeProxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(proxy: FakeProxy) -> Iterator[ServeClient]:
    host, port = proxy.server_address[:2]
    settings = Settings(
        serve_url=f"http://{host}:{port}",
        serve_read_timeout_s=READ_TIMEOUT_S,
        serve_ack_timeout_s=ACK_TIMEOUT_S,
        serve_max_connections=1,  # the retry must find the stalled connection gone
    )
    c = ServeClient(settings)
    yield c
    c.close()


def call(client: ServeClient, x: int) -> Any:
    return client._request("post", "/route", {"x": x}, {})


def test_a_swallowed_request_on_a_reused_connection_is_sent_again_at_once(
    client: ServeClient, proxy: FakeProxy
) -> None:
    assert call(client, 1) == {"echo": {"x": 1}}  # the connection is now idle in the pool
    proxy.swallow_reused = True
    start = time.monotonic()
    assert call(client, 2) == {"echo": {"x": 2}}
    took = time.monotonic() - start
    assert proxy.swallowed == [{"x": 2}]
    assert proxy.answered == [{"x": 1}, {"x": 2}]
    assert took < READ_TIMEOUT_S / 2, f"the lost request cost {took:.1f}s"


def test_a_slow_answer_after_the_receipt_is_waited_for_not_sent_again(
    client: ServeClient, proxy: FakeProxy
) -> None:
    call(client, 1)
    proxy.delay_s = ACK_TIMEOUT_S * 4
    assert call(client, 2) == {"echo": {"x": 2}}
    assert proxy.answered == [{"x": 1}, {"x": 2}]


def test_a_server_that_never_acknowledges_is_not_bounded(
    client: ServeClient, proxy: FakeProxy
) -> None:
    proxy.acks = False
    proxy.delay_s = ACK_TIMEOUT_S * 4
    assert call(client, 1) == {"echo": {"x": 1}}
    assert call(client, 2) == {"echo": {"x": 2}}
    assert proxy.answered == [{"x": 1}, {"x": 2}]


def test_receipt_backend_bounds_only_requests_with_expect() -> None:
    """The bound is armed by the header; other requests on the pool keep their timeouts."""
    backend = ReceiptBackend(ACK_TIMEOUT_S)
    backend.server_acks = True
    with socket.create_server(("127.0.0.1", 0)) as srv:
        stream = backend.connect_tcp("127.0.0.1", srv.getsockname()[1], timeout=5)
        peer, _ = srv.accept()
        with peer:
            stream.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            start = time.monotonic()
            with pytest.raises(httpcore.ReadTimeout) as e:
                stream.read(100, timeout=ACK_TIMEOUT_S * 3)
            assert not isinstance(e.value, Unacknowledged)
            assert time.monotonic() - start >= ACK_TIMEOUT_S * 3
            stream.close()


def test_the_bound_follows_the_receipt_time_never_under_the_floor() -> None:
    backend = ReceiptBackend(ACK_TIMEOUT_S)
    assert backend.bound() == ACK_TIMEOUT_S
    for _ in range(20):
        backend.observe(0.002)  # a healthy proxy
    assert backend.bound() == ACK_TIMEOUT_S
    backend.observe(2.0)  # a proxy whose event loop is seconds behind
    assert backend.bound() == 4.0
    for _ in range(ReceiptBackend.RECENT):
        backend.observe(0.002)
    assert backend.bound() == ACK_TIMEOUT_S  # the slow receipt has left the window
    calm = ReceiptBackend(ACK_TIMEOUT_S)
    calm.observe(0.002)
    calm.missed(ACK_TIMEOUT_S)
    assert calm.unacknowledged == 1
    assert calm.bound() > ACK_TIMEOUT_S  # backs off after a miss
    assert ReceiptBackend(0).bound() is None


def test_a_proxy_that_misses_receipts_often_gets_no_second_copies() -> None:
    busy = ReceiptBackend(ACK_TIMEOUT_S)
    for _ in range(ReceiptBackend.OVERLOADED_MISSES - 1):
        busy.missed(busy.bound() or 0)
    assert busy.bound() is not None  # a few misses: still lost requests, worth re-sending
    busy.missed(busy.bound() or 0)
    assert busy.bound() is None  # overloaded: a re-send would only add to its load
    for _ in range(ReceiptBackend.RECENT):
        busy.observe(0.002)
    assert busy.bound() == ACK_TIMEOUT_S  # the misses have left the window


def test_with_the_receipt_off_no_expect_header_is_sent(proxy: FakeProxy) -> None:
    host, port = proxy.server_address[:2]
    off = ServeClient(Settings(serve_url=f"http://{host}:{port}", serve_ack_timeout_s=0))
    try:
        assert call(off, 1) == {"echo": {"x": 1}}
    finally:
        off.close()
    assert proxy.expects == [""]
