"""Model admission: at most N models in flight across all workers, served in fair waves.

Why: Serve holds a bounded number of models per replica. When queued jobs name more
models than the replicas can hold, FIFO order makes every replica's LRU thrash (the
bench's W3: 8 models over 2 replicas x 3 slots, 287 loads for 2,000 jobs). With
``SYNAPSE_BRIDGE_ACTIVE_MODELS`` set, only that many models are *active*; a job for
another model is refused and goes back to the queue. The queue is then served in waves
of models (W3: 16 loads, one per model per replica).

Set it to the deployment's ``max_models_per_replica``, not replicas x that: Ray routes
a model it has not yet seen loaded to the replica with the fewest models, so every
replica may load every active model. When each can hold them all, no replica evicts
a model in use, and a model is loaded at most once per replica per wave.

How, and why this way:

- **In flight is a lease per job**, not a counter: ``lease:<model>`` is a sorted set of
  job ids scored by their lease's expiry (the task's time limit; a long job renews).
  ``leave(key, job_id)`` removes that job's lease only, so a second leave, or a leave
  after the lease expired, changes nothing; a worker that dies leaks its leases for at
  most the lease time. A model with a live lease is never evicted: a long batch keeps
  its model active however long the others wait.
- **Eviction**: an active model with no live lease leaves the active set once it has
  been idle ``idle_s`` and some model waits for its slot (or at once, when it drains).
- **Order**: a refused job registers its model as waiting, scored by the job's original
  arrival time (``submitted_at``), but never earlier than the model last left the active
  set (a model just drained queues behind the others). A free slot goes to the waiting
  models in score order: the k free slots belong to the k oldest waiters, and a job for
  a model further back is refused even while a slot is free. The score comes from the
  job, so a refused job that is re-published keeps its place even if its model's entry
  lapsed meanwhile (an entry not refreshed by a refusal for ``waiter_ttl_s`` is dropped,
  so a model whose jobs vanished does not hold a slot forever).
- **No starvation**: when the oldest waiter has waited longer than ``max_wait_s``, every
  active model that has itself been active for ``max_wait_s`` stops admitting new jobs
  (it *drains*); once its leases end it is evicted at once and the slot goes to the
  oldest waiter. The minimum active time is what keeps waves: without it, under a long
  backlog every waiter is "starving", and each newly admitted model would drain after
  one job, a load per job. The bound for the oldest waiter is then about
  ``max_wait_s`` + the longest job in flight + one trip of its job through the queue;
  a model k-th in line waits about k / capacity such rounds more. ``max_wait_s = 0``
  turns draining off (waves only, as before: a model with steady traffic can then keep
  others out indefinitely).
- **Waiting: re-publish, not block.** A refused job goes back to the queue (keeping
  ``submitted_at``), as before: blocking worker threads on jobs whose model waits would
  take the threads that serve the active models, cut every wave short and bring back
  the reloads W3 measures. The exception is the head of the line while a slot is
  draining for it: ``wait_for_turn`` holds that job (up to its timeout) until the slot
  frees, so it does not miss its turn by being at the far end of a long queue.
- **Deadlock**: none. Every wait is bounded (``wait_for_turn``'s timeout; the other
  refusals return at once), so threads holding waiting jobs always come back; and an
  active model nobody serves has no live lease, falls idle and is evicted in favour of
  the oldest waiter, whose jobs then run (tests/test_admission.py shows both).

The state lives in Redis, shared by the workers, and changes only in Lua scripts
(atomic across processes): ``<ns>:active`` (zset model -> last use), ``<ns>:since``
(hash model -> when it became active), ``<ns>:lease:<model>`` (zset job -> lease
expiry), ``<ns>:waiting`` (zset model -> score), ``<ns>:seen`` (zset model -> last
refusal), ``<ns>:left`` (zset model -> when it last left), ``<ns>:stats`` (hash:
activations, evictions). The lease keys are named inside the scripts: one Redis, or a
cluster with the namespace's hash tag (``{...}``) keeping them in one slot.

The pipeline's calls: ``wait_for_turn(key, job_id, arrived_at, timeout_s)`` before
the job runs (False: re-publish it with its ``submitted_at``); ``renew(key, job_id)``
while a long job runs; ``leave(key, job_id)`` when it ends, whatever the outcome
(harmless for a job that was never admitted).
"""

from __future__ import annotations

import time
from typing import Any

import redis

NAMESPACE = "{synapse:admission}"

REFUSED, ADMITTED, NEXT = 0, 1, 2  # NEXT: refused, but a slot is draining for this model

# KEYS: active, since, waiting, seen, left, stats.
# ARGV: key, job_id, arrived_at, now, lease_s, capacity, idle_s, max_wait_s,
#       waiter_ttl_s, lease key prefix.
_ADMIT = """
local active, since, waiting, seen, left, stats =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local key, job = ARGV[1], ARGV[2]
local arrived, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_s, capacity = tonumber(ARGV[5]), tonumber(ARGV[6])
local idle_s, max_wait, ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local lp = ARGV[10]
local function num(x) return string.format('%.17g', x) end  -- exact, unlike x .. ''

-- Dead leases and waiters nobody asked for lately are forgotten first.
local models = redis.call('zrange', active, 0, -1, 'WITHSCORES')
local live, last, n_active = {}, {}, 0
for i = 1, #models, 2 do
  local m = models[i]
  redis.call('zremrangebyscore', lp .. m, '-inf', num(now))
  live[m] = redis.call('zcard', lp .. m)
  last[m] = tonumber(models[i + 1])
  n_active = n_active + 1
end
for _, m in ipairs(redis.call('zrangebyscore', seen, '-inf', num(now - ttl))) do
  redis.call('zrem', waiting, m)
  redis.call('zrem', seen, m)
end
redis.call('zremrangebyscore', left, '-inf', num(now - 86400))

-- The oldest waiter; when it has waited past max_wait, the models active for at least
-- max_wait drain: they admit no new job, and go as soon as their leases end.
-- (A drained model still active may be in the line too: it holds a slot, it is skipped.)
local head, head_score = nil, nil
local firsts = redis.call('zrange', waiting, 0, capacity, 'WITHSCORES')
for i = 1, #firsts, 2 do
  if live[firsts[i]] == nil then
    head, head_score = firsts[i], tonumber(firsts[i + 1])
    break
  end
end
local starving = max_wait > 0 and head ~= nil and (now - head_score) > max_wait
local function draining(m)
  if not starving or live[m] == nil then return false end
  return now - tonumber(redis.call('hget', since, m) or now) >= max_wait
end

local function grant()
  local lease = lp .. key
  redis.call('zadd', lease, num(now + lease_s), job)
  redis.call('expire', lease, math.ceil(lease_s) + 60)
  if live[key] == nil then
    redis.call('hset', since, key, num(now))
    redis.call('hincrby', stats, 'activations', 1)
  end
  redis.call('zadd', active, num(now), key)
  redis.call('zrem', waiting, key)
  redis.call('zrem', seen, key)
  return 1
end

local function wait(score)
  local old = redis.call('zscore', waiting, key)
  if not old or tonumber(old) > score then redis.call('zadd', waiting, num(score), key) end
  redis.call('zadd', seen, num(now), key)
end

if live[key] ~= nil then
  if not draining(key) then return grant() end
  wait(now)  -- behind every model waiting now
  return 0
end

local score = math.max(arrived, tonumber(redis.call('zscore', left, key) or '0'))
local old = redis.call('zscore', waiting, key)
if old and tonumber(old) < score then score = tonumber(old) end
local ahead = redis.call('zcount', waiting, '-inf', '(' .. num(score))
for m, _ in pairs(live) do
  local s = redis.call('zscore', waiting, m)
  if s and tonumber(s) < score then ahead = ahead - 1 end
end
local free = capacity - n_active
local need = ahead + 1 - free
if need > 0 then
  local idle = {}
  for m, n in pairs(live) do
    if n == 0 and (last[m] <= now - idle_s or draining(m)) then
      table.insert(idle, m)
    end
  end
  table.sort(idle, function(a, b) return last[a] < last[b] end)
  for i = 1, math.min(need, #idle) do
    local m = idle[i]
    redis.call('zrem', active, m)
    redis.call('hdel', since, m)
    redis.call('del', lp .. m)
    redis.call('zadd', left, num(now), m)
    redis.call('hincrby', stats, 'evictions', 1)
    live[m] = nil
    local s = redis.call('zscore', waiting, m)  -- drained while active, in the line now
    if s and tonumber(s) < score then ahead = ahead + 1 end
    free = free + 1
  end
end
if ahead < free then return grant() end
wait(score)
if ahead == 0 and max_wait > 0 and now - score > max_wait then  -- first in line, starving
  for m, _ in pairs(live) do
    if now - tonumber(redis.call('hget', since, m) or now) >= max_wait then return 2 end
  end
end
return 0
"""

# KEYS: active, lease. ARGV: key, job_id, now. 1: a live lease ended.
_LEAVE = """
local expiry = redis.call('zscore', KEYS[2], ARGV[2])
if not expiry then return 0 end
redis.call('zrem', KEYS[2], ARGV[2])
if tonumber(expiry) <= tonumber(ARGV[3]) then return 0 end  -- expired: nothing else
redis.call('zadd', KEYS[1], 'XX', ARGV[3], ARGV[1])  -- last use, idle from now
return 1
"""

# KEYS: lease. ARGV: job_id, now, lease_s. 1: renewed; 0: no live lease to renew.
_RENEW = """
local expiry = redis.call('zscore', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], string.format('%.17g', tonumber(ARGV[2]) + tonumber(ARGV[3])), ARGV[1])
redis.call('expire', KEYS[1], math.ceil(tonumber(ARGV[3])) + 60)
return 1
"""

# KEYS: active, waiting. ARGV: now, lease key prefix. One consistent view.
_SNAPSHOT = """
local out = {}
local models = redis.call('zrange', KEYS[1], 0, -1)
for _, m in ipairs(models) do
  table.insert(out, m)
  table.insert(out, redis.call('zcount', ARGV[2] .. m, '(' .. ARGV[1], '+inf'))
end
return {out, redis.call('zrange', KEYS[2], 0, -1)}
"""


class ModelAdmission:
    """At most ``capacity`` models with jobs in flight, shared by every worker process.

    ``lease_s``: how long a job holds its model without ``renew`` (the task's hard time
    limit). ``idle_s``: how long an active model with nothing in flight keeps its slot
    while others wait. ``max_wait_s``: past this, the oldest waiting model makes the
    models active at least as long drain (0: never). ``waiter_ttl_s``: a waiting model
    no job asked for in this long loses its reserved turn (default ``max(60, 2 x
    max_wait_s)``). ``refuse_pause_s``: ``wait_for_turn`` pauses this long before
    answering False, so a re-published job does not loop hot.
    """

    def __init__(
        self,
        r: redis.Redis,
        capacity: int,
        *,
        lease_s: float = 660.0,
        idle_s: float = 0.5,
        max_wait_s: float = 60.0,
        waiter_ttl_s: float | None = None,
        poll_s: float = 0.05,
        refuse_pause_s: float = 0.1,
        namespace: str = NAMESPACE,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 model")
        if lease_s <= 0:
            raise ValueError("lease_s must be greater than 0")
        self.r = r
        self.capacity = capacity
        self.lease_s = lease_s
        self.idle_s = idle_s
        self.max_wait_s = max_wait_s
        self.waiter_ttl_s = waiter_ttl_s if waiter_ttl_s is not None else max(60.0, 2 * max_wait_s)
        self.poll_s = poll_s
        self.refuse_pause_s = refuse_pause_s
        self.ns = namespace
        self.keys = [
            f"{namespace}:{name}"
            for name in ("active", "since", "waiting", "seen", "left", "stats")
        ]
        self._admit = r.register_script(_ADMIT)
        self._leave = r.register_script(_LEAVE)
        self._renew = r.register_script(_RENEW)
        self._snapshot = r.register_script(_SNAPSHOT)

    def _lease_key(self, key: str) -> str:
        return f"{self.ns}:lease:{key}"

    def try_admit(self, key: str, job_id: str, arrived_at: float | None = None) -> int:
        """ADMITTED, REFUSED, or NEXT (refused; a slot is draining for this model)."""
        now = time.time()
        args = [
            key,
            job_id,
            now if arrived_at is None else arrived_at,
            now,
            self.lease_s,
            self.capacity,
            self.idle_s,
            self.max_wait_s,
            self.waiter_ttl_s,
            f"{self.ns}:lease:",
        ]
        return int(self._admit(keys=self.keys, args=args))

    def admit(self, key: str, job_id: str, arrived_at: float | None = None) -> bool:
        """True: the job holds a lease on its model now (``leave`` it when it ends).

        False: its model waits; the refusal registered it in the line, by ``arrived_at``
        (the job's original arrival, unix time; None: now).
        """
        return self.try_admit(key, job_id, arrived_at) == ADMITTED

    def wait_for_turn(
        self, key: str, job_id: str, arrived_at: float | None = None, timeout_s: float = 10.0
    ) -> bool:
        """``admit``, held while this model is next in line and a slot drains for it.

        Returns True once admitted. False (after ``refuse_pause_s``) when the model is not
        next, or ``timeout_s`` passed: re-publish the job, keeping its arrival time.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.try_admit(key, job_id, arrived_at)
            if status == ADMITTED:
                return True
            left = deadline - time.monotonic()
            if status == REFUSED or left <= 0:
                time.sleep(max(0.0, min(self.refuse_pause_s, left)))
                return False
            time.sleep(min(self.poll_s, left))

    def renew(self, key: str, job_id: str) -> bool:
        """Extend a running job's lease by ``lease_s`` from now; False: no live lease."""
        return bool(
            self._renew(keys=[self._lease_key(key)], args=[job_id, time.time(), self.lease_s])
        )

    def leave(self, key: str, job_id: str) -> bool:
        """End this job's lease. True: a live lease ended; False: nothing changed."""
        return bool(
            self._leave(keys=[self.keys[0], self._lease_key(key)], args=[key, job_id, time.time()])
        )

    def snapshot(self) -> dict[str, Any]:
        """One consistent view: active models with their live leases, waiting models in order."""
        active, waiting = self._snapshot(
            keys=[self.keys[0], self.keys[2]], args=[time.time(), f"{self.ns}:lease:"]
        )
        pairs = iter(active)
        return {
            "active": {m.decode(): int(n) for m, n in zip(pairs, pairs, strict=True)},
            "waiting": [m.decode() for m in waiting],
            "stats": {k.decode(): int(v) for k, v in self.r.hgetall(self.keys[5]).items()},
        }
