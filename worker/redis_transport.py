"""kombu's Redis transport, with one synchronous client per channel, that keeps its
broker address for as long as a channel may need it.

kombu builds a new ``redis.Redis`` for every synchronous command it sends: each
delivery's unacked record, each ack. A client's constructor copies a table of some
two hundred response callbacks; the bench's W1 profile put that at ~8% of the worker's
CPU. The client is a thin, thread-safe handle on the channel's connection pool, so
one per pool does the same work. Used for ``redis://`` brokers only (``worker.app``).

When Celery's consumer loses the broker it ``collect()``s the connection, which makes
kombu forget the transport's connection info (``transport.client = None``), and then
``close()``s it. A channel the first pass could not close (its BRPOP read failed, and
the broadcast channel's close failed before it) is closed on the second, and must still
reach Redis to put its unacknowledged messages back. With the address gone kombu raised
``AttributeError`` there: Celery's "Unrecoverable error", and the worker stopped
consuming (R4 in CI: 1,376 of 2,000 jobs never run; tests/test_redis_transport.py). So
the transport keeps the last address it was given.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:  # new pool: new client
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
    _client: Any = None

    @property
    def client(self) -> Any:
        return self._client

    @client.setter
    def client(self, value: Any) -> None:
        if value is not None:  # kombu's "forget it" (None) is ignored
            self._client = value


TRANSPORT = f"{__name__}:Transport"
