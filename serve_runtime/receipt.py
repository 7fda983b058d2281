"""Knowing within a fraction of a second that the server has a request (issue 13).

A request the proxy never reads looks, to a client, like a slow inference: no answer
until the read timeout (60 s). To tell them apart the client sends
``Expect: 100-continue``: uvicorn (Ray Serve's proxy) answers ``100 Continue`` as soon
as the proxy's handler starts reading the request, before it is routed to a replica, so
that interim answer is a receipt that does not depend on how long the inference takes.

``ReceiptBackend`` wraps httpcore's socket backend: the first read after a request
head carrying that header waits at most the receipt bound (``ack_timeout_s``, raised
while the proxy acknowledges slowly); silence past it raises ``Unacknowledged`` (an
``httpcore.ReadTimeout``) and the caller sends the request again.
The bound is armed only once the server has been seen to send a ``100 Continue``, so a
server that ignores the header only costs a header.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import httpcore

EXPECT_HEADER = {"expect": "100-continue"}
_EXPECT = b"\r\nexpect: 100-continue\r\n"
_INTERIM = (b"HTTP/1.1 100 ", b"HTTP/1.0 100 ")


class Unacknowledged(httpcore.ReadTimeout):
    """The server sent nothing for a request within the receipt bound."""


def is_unacknowledged(error: BaseException) -> bool:
    """Whether httpx's error comes from a missing receipt (httpx keeps the cause)."""
    return isinstance(error, Unacknowledged) or isinstance(error.__cause__, Unacknowledged)


class _ReceiptStream(httpcore.NetworkStream):
    """One connection: the first read after an ``Expect`` request head is bounded."""

    def __init__(self, stream: httpcore.NetworkStream, backend: ReceiptBackend) -> None:
        self._stream = stream
        self._backend = backend
        self._at_head = True  # the next write starts a request
        self._armed = False  # a request with Expect was sent, nothing read since
        self._sent_at = 0.0

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._at_head:
            self._at_head = False
            head = buffer[: buffer.find(b"\r\n\r\n") + 2]
            self._armed = _EXPECT in head.lower()
        self._stream.write(buffer, timeout)
        self._sent_at = time.monotonic()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._at_head = True
        if not self._armed:
            return self._stream.read(max_bytes, timeout)
        self._armed = False
        backend = self._backend
        bound = backend.bound() if backend.server_acks else None
        if bound is None or (timeout is not None and timeout <= bound):
            data = self._stream.read(max_bytes, timeout)
        else:
            try:
                data = self._stream.read(max_bytes, bound)
            except httpcore.ReadTimeout:
                backend.missed(bound)
                raise Unacknowledged(f"no receipt for the request within {bound:.2f}s") from None
        if data.startswith(_INTERIM):
            backend.server_acks = True
        if data:
            backend.observe(time.monotonic() - self._sent_at)
        return data

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _ReceiptStream(self._stream.start_tls(*args, **kwargs), self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class ReceiptBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, its streams' receipts bounded (``ack_timeout_s`` 0: never).

    The bound is twice the slowest of the last ``RECENT`` receipts, never under
    ``ack_timeout_s``. A healthy proxy acknowledges in milliseconds, so a lost request
    costs ``ack_timeout_s``; a saturated one (its event loop seconds behind, receipts
    with a long tail) raises the bound rather than have its slow receipts sent twice,
    and the bound comes down once ``RECENT`` quick receipts have passed. A miss counts
    as a receipt twice as late as its bound (the back-off); ``OVERLOADED_MISSES`` misses
    among the last ``RECENT`` requests disarm the bound until they leave the window. The probe
    (``bench/stall_probe.py``) reports receipt times and re-sends.
    """

    RECENT = 256
    # Misses among the last RECENT requests past which nothing is sent again: a proxy
    # that misses that often is overloaded, not losing requests, and a second copy of
    # each late request would only add to its load (bench W2, 2 cores: 174 re-sends
    # in one run, at bounds up to 3.75 s, before this).
    OVERLOADED_MISSES = 4

    def __init__(self, ack_timeout_s: float) -> None:
        self._inner = httpcore.SyncBackend()
        self.ack_timeout_s = ack_timeout_s
        # Learned from the first interim answer: until then no request is bounded.
        self.server_acks = False
        self.unacknowledged = 0  # requests that got no receipt in time (a figure to watch)
        self._recent: deque[float] = deque(maxlen=self.RECENT)
        self._missed: deque[bool] = deque(maxlen=self.RECENT)
        self._lock = threading.Lock()

    def bound(self) -> float | None:
        """How long the next request may go without a receipt; None: unbounded."""
        if self.ack_timeout_s <= 0:
            return None
        with self._lock:
            if sum(self._missed) >= self.OVERLOADED_MISSES:
                return None  # overloaded: wait for the answer, as without a receipt
            slowest = max(self._recent, default=0.0)
        return max(self.ack_timeout_s, 2 * slowest)

    def observe(self, seconds: float) -> None:
        """A receipt came ``seconds`` after the request."""
        with self._lock:
            self._recent.append(seconds)
            self._missed.append(False)

    def missed(self, bound: float) -> None:
        with self._lock:
            self.unacknowledged += 1
            self._recent.append(2 * bound)
            self._missed.append(True)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _ReceiptStream(stream, self)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _ReceiptStream(self._inner.connect_unix_socket(path, timeout, socket_options), self)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)
