"""Model admission: at most N models in flight across all workers, served in waves.

Why: Serve holds a bounded number of models per replica. When queued jobs name more
models than the replicas can hold, FIFO order makes every replica's LRU thrash (the
bench's W3: 8 models over 2 replicas x 3 slots, 287 loads for 2,000 jobs). With
``SYNAPSE_BRIDGE_ACTIVE_MODELS`` set, a job whose model is not among the active ones
goes back to the end of the queue; a model leaves the active set once it has had no
job in flight for ``SYNAPSE_BRIDGE_MODEL_IDLE`` seconds and another model is waiting.
The queue is then served in waves of models.

Set it to the deployment's ``max_models_per_replica``, not replicas x that: Ray routes
a model it has not yet seen loaded to the replica with the fewest models, so every
replica may load every active model. When each can hold them all, no replica evicts
a model in use, and a model is loaded at most once per replica per wave (W3: 16
loads for 8 models on 2 replicas; 45, 55 and 92 with 4, 5 and 6 active models).

The state lives in Redis, shared by the workers: ``synapse:models:active`` (model key
-> last use) and ``synapse:models:inflight`` (model key -> jobs running). A worker
that dies leaks its in-flight counts; a model unused for ``stale_s`` is idle whatever
its count says.
"""

from __future__ import annotations

import time

import redis

ACTIVE = "synapse:models:active"
INFLIGHT = "synapse:models:inflight"

# KEYS: active, inflight. ARGV: key, now, capacity, idle_s, stale_s. 1: admitted.
_ENTER = """
local key, now = ARGV[1], tonumber(ARGV[2])
local function admit()
  redis.call('hset', KEYS[1], key, now)
  redis.call('hincrby', KEYS[2], key, 1)
  return 1
end
if redis.call('hexists', KEYS[1], key) == 1 then return admit() end
if redis.call('hlen', KEYS[1]) < tonumber(ARGV[3]) then return admit() end
local idle_before, stale_before = now - tonumber(ARGV[4]), now - tonumber(ARGV[5])
local oldest, oldest_at = nil, nil
local active = redis.call('hgetall', KEYS[1])
for i = 1, #active, 2 do
  local k, used = active[i], tonumber(active[i + 1])
  local running = tonumber(redis.call('hget', KEYS[2], k) or '0')
  if (running <= 0 and used < idle_before) or used < stale_before then
    if oldest_at == nil or used < oldest_at then oldest, oldest_at = k, used end
  end
end
if oldest == nil then return 0 end
redis.call('hdel', KEYS[1], oldest)
redis.call('hdel', KEYS[2], oldest)
return admit()
"""

# KEYS: active, inflight. ARGV: key, now.
_LEAVE = """
if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then
  redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
  if redis.call('hincrby', KEYS[2], ARGV[1], -1) <= 0 then redis.call('hdel', KEYS[2], ARGV[1]) end
end
return 1
"""


class ModelAdmission:
    def __init__(
        self, r: redis.Redis, capacity: int, idle_s: float = 0.5, stale_s: float = 300.0
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 model")
        self.capacity = capacity
        self.idle_s = idle_s
        self.stale_s = stale_s
        self._enter = r.register_script(_ENTER)
        self._leave = r.register_script(_LEAVE)

    def enter(self, key: str) -> bool:
        """True: run the job now (call ``leave`` after); False: its model must wait."""
        args = [key, time.time(), self.capacity, self.idle_s, self.stale_s]
        return bool(self._enter(keys=[ACTIVE, INFLIGHT], args=args))

    def leave(self, key: str) -> None:
        self._leave(keys=[ACTIVE, INFLIGHT], args=[key, time.time()])
