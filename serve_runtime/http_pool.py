"""One httpx transport whose connections are split over a few small httpcore pools.

httpcore 1.0.9's ``ConnectionPool`` rescans all its connections, under one lock, at
every request start and every response close: O(connections^2) for the idle check,
O(queued x connections) to place waiting requests, and a poll syscall per idle
connection for its expiry. With 100-200 connections and 192 threads, that scan and
the threads queued on its lock grew the client's CPU per request with the thread count
(bench/FINDINGS.md, "Issue 13"). Here a request first takes a slot (a semaphore of
``max_connections``, waited on up to the pool timeout), then goes to the shard with
the most free slots: a shard holds at most ``SHARD_CONNECTIONS`` connections and never
has a request queued inside it, so its scan stays short. The limits keep their
meaning: at most ``max_connections`` connections in all, and a request waits only
while all of them are busy.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType

import httpcore
import httpx

# A shard's scan costs O(its connections^2); 8 measured below 16 at 64 and 192 threads
# (bench/http_pool.py), and picking among more shards costs next to nothing.
SHARD_CONNECTIONS = 8


def shard_sizes(total: int, per_shard: int = SHARD_CONNECTIONS) -> list[int]:
    """``total`` split into the fewest near-equal parts of at most ``per_shard``."""
    if total < 1 or per_shard < 1:
        raise ValueError(f"total ({total}) and per_shard ({per_shard}) must be >= 1")
    count = -(-total // per_shard)
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


class ShardedConnectionPool:
    """Several ``httpcore.ConnectionPool`` shards behind one ``handle_request``.

    A request holds a slot of its shard from ``handle_request`` until its response is
    closed: the time it holds a connection.
    """

    def __init__(
        self,
        limits: httpx.Limits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        network_backend: httpcore.NetworkBackend | None = None,
        per_shard: int = SHARD_CONNECTIONS,
    ) -> None:
        total = limits.max_connections
        sizes: list[int | None] = list(shard_sizes(total, per_shard)) if total else [None]
        keep = limits.max_keepalive_connections
        keep_sizes: list[int | None]
        if keep is None:
            keep_sizes = [None] * len(sizes)
        else:  # the same split, so the shards keep at most `keep` idle connections in all
            base, extra = divmod(keep, len(sizes))
            keep_sizes = [base + (1 if i < extra else 0) for i in range(len(sizes))]
        self._shards = [
            httpcore.ConnectionPool(
                ssl_context=ssl_context,
                max_connections=size,
                max_keepalive_connections=kept,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=network_backend,
            )
            for size, kept in zip(sizes, keep_sizes, strict=True)
        ]
        self.sizes = sizes
        # Taken before a shard is picked, so a shard is only picked with a free slot.
        self._slots = threading.Semaphore(total) if total else None
        self._free = [size if size is not None else 1 << 30 for size in sizes]
        self._lock = threading.Lock()

    @property
    def shards(self) -> list[httpcore.ConnectionPool]:
        return list(self._shards)

    def _take(self, request: httpcore.Request) -> int:
        """A free slot's shard; waits up to the request's pool timeout for one."""
        if self._slots is not None:
            timeouts = request.extensions.get("timeout", {})
            if not self._slots.acquire(timeout=timeouts.get("pool")):
                raise httpcore.PoolTimeout("no connection became free within the pool timeout")
        with self._lock:
            free = self._free
            index = free.index(max(free))
            free[index] -= 1
            return index

    def _give(self, index: int) -> None:
        with self._lock:
            self._free[index] += 1
        if self._slots is not None:
            self._slots.release()

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        index = self._take(request)
        try:
            response = self._shards[index].handle_request(request)
        except BaseException:
            self._give(index)
            raise
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_ShardStream(response, self, index),
            extensions=response.extensions,
        )

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> ShardedConnectionPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()


class _ShardStream:
    """A shard's response body; closing it (once) frees the shard's slot."""

    def __init__(self, response: httpcore.Response, pool: ShardedConnectionPool, index: int):
        # The shard's stream itself: ``Response.iter_stream`` checks it against
        # ``typing.Iterable`` first, slow enough to show in the profile at 192 threads.
        self._stream = response.stream
        self._pool = pool
        self._index = index
        self._closed = False
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._stream, Iterable)  # the sync pool's stream
        yield from self._stream

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._pool._give(self._index)


class ShardedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` (its request and error mapping) over the sharded pool."""

    def __init__(
        self,
        limits: httpx.Limits,
        *,
        network_backend: httpcore.NetworkBackend | None = None,
        per_shard: int = SHARD_CONNECTIONS,
    ) -> None:
        # One SSL context for both pools: loading the CA bundle is ~20 ms each.
        ssl_context = httpx.create_ssl_context()
        super().__init__(limits=limits, verify=ssl_context)
        self._pool.close()  # httpx's own pool, unused (it holds no connection yet)
        self._pool = ShardedConnectionPool(
            limits,
            ssl_context=ssl_context,
            network_backend=network_backend,
            per_shard=per_shard,
        )

    @property
    def pool(self) -> ShardedConnectionPool:
        assert isinstance(self._pool, ShardedConnectionPool)
        return self._pool
