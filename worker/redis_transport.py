"""kombu's Redis transport, with one synchronous client per channel, that keeps its
broker address for as long as a channel may need it, and takes what waits in the
queue in one round trip.

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

**Taking messages in batches.** kombu takes one message per BRPOP, then records it as
unacknowledged (the visibility timeout's record) in a second round trip, each on the
consumer's one thread: a quarter of the worker's CPU in a W2 profile went there. Here,
once a BRPOP returns a message, one script records it and pops as many more as the
prefetch allows (``can_consume_max_estimate``, at most ``MAX_BATCH``) from the same
queue, in BRPOP's priority order, recording each as unacknowledged as it pops it:
kombu's record, byte for byte the message it popped. Then all are delivered. A message
alone costs what it did (BRPOP and one script instead of BRPOP and one pipeline); a
backlog costs two round trips per batch. A popped message the script cannot read
(not JSON, no delivery tag) goes back where it was, and the batch ends: the next BRPOP
takes it alone, down kombu's own path.

**Acks in one pipeline.** kombu acks with a MULTI/EXEC of two commands from each task
thread (10% of the worker's GIL time once batches were taken). Here an ack is one
script call, and the acks of many threads that arrive together go in one pipeline
(``worker.script_batch``).
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.commands.core import Script

from worker.script_batch import BatchedScript, ScriptBatch

# The most messages one script pops (beyond the one BRPOP returned).
MAX_BATCH = 100

# KEYS: unacked index, unacked hash, the queue's priority lists in BRPOP's order.
# ARGV: now, how many more to pop, the first message's delivery tag and its record.
_TAKE = """
local now, n = ARGV[1], tonumber(ARGV[2])
redis.call('zadd', KEYS[1], now, ARGV[3])
redis.call('hset', KEYS[2], ARGV[3], ARGV[4])
local out = {}
for i = 3, #KEYS do
  while #out < n do
    local item = redis.call('rpop', KEYS[i])
    if not item then break end
    local ok, m = pcall(cjson.decode, item)
    local p = ok and type(m) == 'table' and m['properties']
    local info = type(p) == 'table' and p['delivery_info']
    local tag = type(p) == 'table' and p['delivery_tag']
    if type(tag) ~= 'string' or type(info) ~= 'table'
        or type(info['exchange']) ~= 'string' or type(info['routing_key']) ~= 'string' then
      redis.call('rpush', KEYS[i], item)
      return out
    end
    redis.call('zadd', KEYS[1], now, tag)
    redis.call('hset', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
      .. ',' .. cjson.encode(info['routing_key']) .. ']')
    out[#out + 1] = item
  end
  if #out >= n then break end
end
return out
"""


# KEYS: unacked index, unacked hash. ARGV: delivery tag.
_ACK = """
redis.call('zrem', KEYS[1], ARGV[1])
redis.call('hdel', KEYS[2], ARGV[1])
return 1
"""


class QoS(kombu_redis.QoS):
    """kombu's, except that a message the batch script recorded is not recorded again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.channel.ack_script()(
            keys=[self.unacked_index_key, self.unacked_key], args=[delivery_tag]
        )
        virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: Any = None
    _take: Script | None = None
    _ack: BatchedScript | None = None
    _acks: ScriptBatch | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:  # new pool: new client
            client = self._sync_client = super()._create_client()
        return client

    def ack_script(self) -> BatchedScript:
        """The ack, batched on the channel's current client (a new pool, a new batch)."""
        client = self._create_client()
        acks, ack = self._acks, self._ack
        if acks is None or ack is None or acks.redis is not client:
            acks = ScriptBatch(client)
            ack = acks.register_script(_ACK)
            self._acks, self._ack = acks, ack
        return ack

    def _brpop_read(self, **options: Any) -> bool:
        if not self.ack_emulation or self.global_keyprefix:
            return super()._brpop_read(**options)
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next BRPOP reconnects
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        payloads = [loads(bytes_to_str(item))]
        payloads += self._take_more(queue, payloads[0])
        self._deliver_all(payloads, queue)
        return True

    def _take_more(self, queue: str, first: dict[str, Any]) -> list[dict[str, Any]]:
        """Record ``first`` as unacknowledged and pop (and record) what else may come."""
        props = first.get("properties") or {}
        tag, info = props.get("delivery_tag"), props.get("delivery_info") or {}
        if not isinstance(tag, str):
            return []  # kombu's own path records it (or fails on it) as it always did
        room = self.qos.can_consume_max_estimate()
        more = MAX_BATCH if room is None else max(0, min(MAX_BATCH, room - 1))
        record = dumps([first, info.get("exchange"), info.get("routing_key")])
        keys = [self.unacked_index_key, self.unacked_key]
        keys += [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            if self._take is None:
                self._take = client.register_script(_TAKE)
            items = self._take(keys=keys, args=[time.time(), more, tag, record], client=client)
        self.qos.recorded.add(tag)
        taken = [loads(bytes_to_str(i)) for i in items]
        self.qos.recorded.update(p["properties"]["delivery_tag"] for p in taken)
        return taken

    def _deliver_all(self, payloads: list[dict[str, Any]], queue: str) -> None:
        """Every message taken is delivered, even when one delivery raises. A record
        nobody took up (a consumer that does not ack) is removed, as kombu never makes
        one for such a consumer."""
        error: BaseException | None = None
        try:
            for payload in payloads:
                try:
                    self.connection._deliver(payload, queue)
                except Exception as e:
                    error = error or e
        finally:
            unclaimed, self.qos.recorded = self.qos.recorded, set()
            if unclaimed:
                with self.qos.pipe_or_acquire() as pipe:
                    for tag in unclaimed:
                        self.qos._remove_from_indices(tag, pipe)
                    pipe.execute()
        if error is not None:
            raise error


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
