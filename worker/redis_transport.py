"""kombu's Redis transport, with one synchronous client per channel.

kombu builds a new ``redis.Redis`` for every synchronous command it sends: each
delivery's unacked record, each ack. A client's constructor copies a table of some
two hundred response callbacks; the bench's W1 profile put that at ~8% of the worker's
CPU. The client is a thin, thread-safe handle on the channel's connection pool, so
one per pool does the same work. Used for ``redis://`` brokers only (``worker.app``).
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


TRANSPORT = f"{__name__}:Transport"
