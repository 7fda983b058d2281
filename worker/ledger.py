"""The submission ledger: a message published but never started is sent again.

Celery's Redis transport pops a message (BRPOP) before it records it as unacked; a
worker killed in between loses that message, and the broker has no trace of it.
``submit`` therefore records each job here before publishing; the worker removes the
entry when it starts the job (from then on the broker's unacked/visibility-timeout
mechanism covers it). A sweeper in every worker republishes entries that are overdue
while the queue is empty: with nothing queued, a job neither started nor final can
only have been lost. A duplicate is harmless: the final write happens once.

Keys:

- ``synapse:ledger:{job_id}``: the wire dict as given to ``record`` (JSON), with a TTL.
- ``synapse:ledger-due``: a sorted set, job id -> time (unix seconds) the entry is
  overdue. Not under ``synapse:ledger:``, since a job id may be ``due``.

Lifetime: every entry expires ``ttl_s`` after it was last recorded (default
``TTL_GRACES`` graces, the grace being the workers' visibility timeout). A job that
starts removes its entry at once; a sweep that resends a job records it again with a
fresh TTL. An entry therefore expires only when its job was neither started nor
resent for that long: the queue was never empty (a backlog of several visibility
timeouts), or no worker swept. Its message is then in all likelihood still queued; the
cost is that a loss in that window is no longer recovered. The bound keeps what the
entry holds from living in Redis forever. Due-set members whose entry is gone are
pruned by every sweep (all of them once their entry cannot be alive any more, and
those a claim meets at once).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from worker.script_batch import ScriptHost

log = structlog.get_logger("worker.ledger")

ENTRY_PREFIX = "synapse:ledger:"
DUE = "synapse:ledger-due"
LEGACY = "synapse:ledger"  # the old hash without TTLs; moved to entries by the first sweep
TTL_GRACES = 4

# Claim up to ARGV[3] overdue entries atomically (several workers sweep): push their due
# time to ARGV[2] and return [id, wire, id, wire, ...]. Members whose entry has expired
# are dropped from the due set instead of being returned.
_CLAIM = """
local ids = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local wire = redis.call('get', ARGV[4] .. id)
  if wire then
    redis.call('zadd', KEYS[1], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = wire
  else
    redis.call('zrem', KEYS[1], id)
  end
end
return out
"""

# A job started: entry and due time go together. One command, where MULTI/EXEC took four
# and, per job, cost the worker more CPU than both final-write scripts (W2 profile).
# KEYS: entry, due set. ARGV: job id.
_STARTED = """
redis.call('del', KEYS[1])
redis.call('zrem', KEYS[2], ARGV[1])
return 1
"""

# The ledger as an earlier version kept it (one hash, no TTL): each field becomes an
# entry with the TTL (unless a newer one exists), then the hash goes.
_MIGRATE = """
if redis.call('type', KEYS[1])['ok'] ~= 'hash' then return 0 end
local kv = redis.call('hgetall', KEYS[1])
for i = 1, #kv, 2 do
  redis.call('set', ARGV[1] .. kv[i], kv[i + 1], 'EX', ARGV[2], 'NX')
end
redis.call('del', KEYS[1])
return #kv / 2
"""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Ledger:
    """Jobs published but not yet started, in Redis (client with or without decoding)."""

    def __init__(
        self,
        r: redis.Redis,
        grace_s: float,
        ttl_s: float | None = None,
        *,
        scripts: ScriptHost | None = None,
    ) -> None:
        """``scripts``: where ``started`` runs (a ``ScriptBatch`` pipelines the calls of
        many threads); by default alone on ``r``."""
        if grace_s <= 0:
            raise ValueError("grace_s must be positive")
        ttl = TTL_GRACES * grace_s if ttl_s is None else ttl_s
        if ttl <= grace_s:
            raise ValueError("ttl_s must be longer than grace_s: an entry must live to be due")
        self.redis = r
        self.grace_s = grace_s
        self.ttl_s = ttl
        self._claim = r.register_script(_CLAIM)
        self._started = (scripts or r).register_script(_STARTED)
        self._migrate = r.register_script(_MIGRATE)
        self._migrated = False

    def record(self, job_id: str, wire: dict[str, Any], *, after_s: float = 0.0) -> None:
        """Before publishing: ``wire`` is resent as is if the job is lost.

        ``after_s``: the message is delayed that long (a countdown); it is not overdue,
        nor does it expire, before that delay has passed.
        """
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)  # entry and due time together
        pipe.set(ENTRY_PREFIX + job_id, json.dumps(wire), ex=math.ceil(self.ttl_s + after_s))
        pipe.zadd(DUE, {job_id: now + after_s + self.grace_s})
        pipe.execute()

    def started(self, job_id: str) -> None:
        """The job started (or is final): the broker's redelivery covers it from here."""
        self._started(keys=[ENTRY_PREFIX + job_id, DUE], args=[job_id])

    def sweep(
        self,
        queued: Callable[[], int | None],
        resend: Callable[[dict[str, Any]], Any],
        is_final: Callable[[str], bool],
        limit: int = 200,
    ) -> int:
        """Republish up to ``limit`` overdue entries, only when ``queued()`` is 0.

        ``queued``: messages waiting in the job queue, None when unknown (then nothing
        is resent). ``resend(wire)`` publishes a job again and records it anew (as
        ``worker.submit.send_message`` does). ``is_final(job_id)``: the job needs no
        resend; its entry is dropped. Returns how many were resent. An exception from
        ``resend`` propagates; the entries claimed but not resent are due again one
        grace later.
        """
        if not self._migrated:
            moved = self._migrate(keys=[LEGACY], args=[ENTRY_PREFIX, math.ceil(self.ttl_s)])
            self._migrated = True
            if moved:
                log.info("ledger entries moved from the legacy hash", count=int(moved))
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        # A live entry's due time is later than now - (ttl - grace) (record sets both,
        # claims only push the due time on): members at or before that are orphans.
        pipe.zremrangebyscore(DUE, "-inf", now - (self.ttl_s - self.grace_s))
        pipe.zrangebyscore(DUE, "-inf", now, start=0, num=1)
        _, overdue = pipe.execute()
        if not overdue:
            return 0
        waiting = queued()
        if waiting != 0:  # messages waiting, or cannot tell: a lost job is not provable
            return 0
        claimed = self._claim(keys=[DUE], args=[now, now + self.grace_s, limit, ENTRY_PREFIX])
        resent = 0
        for i in range(0, len(claimed), 2):
            job_id, wire = _text(claimed[i]), _text(claimed[i + 1])
            if is_final(job_id):
                self.started(job_id)
                continue
            resend(json.loads(wire))
            resent += 1
        if resent:
            log.warning("republished jobs lost before they started", count=resent)
        return resent


__all__ = ["DUE", "ENTRY_PREFIX", "TTL_GRACES", "Ledger"]
