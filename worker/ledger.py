"""The submission ledger: a message published but never started is sent again.

Celery's Redis transport pops a message (BRPOP) before it records it as unacked; a
worker killed in between loses that message, and the broker has no trace of it.
``submit`` therefore records each job here before publishing; the worker removes the
entry when it starts the job (from then on the broker's unacked/visibility-timeout
mechanism covers it). A sweeper in every worker republishes entries that are overdue
while the queue is empty: with nothing queued, a job neither started nor final can
only have been lost. A duplicate is harmless: the final write happens once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

log = structlog.get_logger("worker.ledger")

LEDGER = "synapse:ledger"
DUE = "synapse:ledger:due"

# Claim overdue entries atomically (several workers sweep): push their due time on.
_CLAIM = """
local ids = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('zadd', KEYS[1], ARGV[2], id) end
return ids
"""


class Ledger:
    def __init__(self, r: redis.Redis, grace_s: float) -> None:
        self.redis = r
        self.grace_s = grace_s
        self._claim = r.register_script(_CLAIM)

    def record(self, job_id: str, wire: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(LEDGER, job_id, json.dumps(wire))
        pipe.zadd(DUE, {job_id: time.time() + self.grace_s})
        pipe.execute()

    def started(self, job_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(DUE, job_id)
        pipe.hdel(LEDGER, job_id)
        pipe.execute()

    def size(self) -> int:
        return int(self.redis.zcard(DUE))

    def sweep(
        self,
        queue_empty: Callable[[], bool],
        resend: Callable[[dict[str, Any]], Any],
        is_final: Callable[[str], bool],
        limit: int = 200,
    ) -> int:
        """Republish overdue entries, only while nothing waits in the queue."""
        if not self.redis.zcard(DUE) or not queue_empty():
            return 0
        now = time.time()
        claimed = self._claim(keys=[DUE], args=[now, now + self.grace_s, limit])
        resent = 0
        for job_id in claimed:
            raw = self.redis.hget(LEDGER, job_id)
            if raw is None or is_final(job_id):
                self.started(job_id)
                continue
            resend(json.loads(raw))
            resent += 1
        if resent:
            log.warning("republished jobs lost before they started", count=resent)
        return resent
