"""Write-back: each job's final write happens once, and no result is ever lost.

The final body is first recorded in an outbox (a Redis hash, ``HSETNX``: the first
computed result wins), then delivered: under a per-job lock, a job already final on
the backend (or marked done here) is left alone, else it is PATCHed and marked done.
When the backend cannot be reached the record stays in the outbox and the flusher
delivers it later; the result is never recomputed because its write failed.
A record the backend refuses outright (4xx) moves to a dead outbox, kept for people.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import redis
import structlog

from config import Settings, get_settings
from worker.backend_api import FINAL_STATUSES, BackendAPI, BackendRejected, BackendUnavailable

log = structlog.get_logger("worker.writeback")

OUTBOX = "synapse:outbox"
DEAD_OUTBOX = "synapse:outbox:dead"
DONE_PREFIX = "synapse:final:"
LOCK_PREFIX = "synapse:final-lock:"

Outcome = Literal["written", "already_final", "outboxed", "dead"]

_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# One round trip before the PATCH. KEYS: outbox, done marker, lock. ARGV: job id, the
# record to add if none is there ('' adds none), lock owner, lock ms.
_CLAIM = """
if ARGV[2] ~= '' then redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2]) end
if redis.call('exists', KEYS[2]) == 1 then
  redis.call('hdel', KEYS[1], ARGV[1])
  return {'done'}
end
local record = redis.call('hget', KEYS[1], ARGV[1])
if not record then return {'none'} end
if not redis.call('set', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then return {'locked'} end
return {'claimed', record}
"""

# One round trip after it: done marker set, record gone, lock released (if still ours).
# KEYS: outbox, done marker, lock. ARGV: job id, marker ttl s, lock owner.
_COMPLETE = """
redis.call('set', KEYS[2], '1', 'EX', ARGV[2])
redis.call('hdel', KEYS[1], ARGV[1])
if redis.call('get', KEYS[3]) == ARGV[3] then redis.call('del', KEYS[3]) end
return 1
"""


class WriteBack:
    def __init__(
        self, backend: BackendAPI, r: redis.Redis, settings: Settings | None = None
    ) -> None:
        self.backend = backend
        self.redis = r
        self.settings = settings or get_settings()
        self._release = r.register_script(_RELEASE_LOCK)
        self._claim = r.register_script(_CLAIM)
        self._complete = r.register_script(_COMPLETE)

    # -- the final write

    def is_done(self, job_id: str) -> bool:
        return bool(self.redis.exists(DONE_PREFIX + job_id))

    def state(self, job_id: str) -> tuple[bool, dict[str, Any] | None]:
        """``(is_done, pending)`` in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(DONE_PREFIX + job_id)
        pipe.hget(OUTBOX, job_id)
        done, raw = pipe.execute()
        return bool(done), (json.loads(raw) if raw else None)

    def finalize(
        self, job_id: str, body: dict[str, Any], *, tenant: str | None = None, verify: bool = True
    ) -> Outcome:
        """Record the final body (first one wins), then try to deliver it now.

        ``verify=False`` skips the backend status check before the PATCH: for a caller
        that read the job's status itself moments ago (the task, at its start). Every
        later delivery (the flusher, a redelivered job) checks again. The caller logs
        the outcome.
        """
        if body.get("status") not in FINAL_STATUSES:
            raise ValueError(f"a final write needs a final status, got {body.get('status')!r}")
        record = {"job_id": job_id, "tenant": tenant, "body": body, "at": time.time()}
        return self._deliver(job_id, json.dumps(record), verify=verify, quiet=True)

    def deliver(self, job_id: str, *, verify: bool = True) -> Outcome:
        """Deliver the outbox record of ``job_id``, at most once."""
        return self._deliver(job_id, "", verify=verify, quiet=False)

    def _deliver(self, job_id: str, new_record: str, *, verify: bool, quiet: bool) -> Outcome:
        keys = [OUTBOX, DONE_PREFIX + job_id, LOCK_PREFIX + job_id]
        owner = uuid.uuid4().hex
        lock_ms = int((self.settings.backend_timeout_s * 2 + 10) * 1000)
        claim = self._claim(keys=keys, args=[job_id, new_record, owner, lock_ms])
        verdict = claim[0].decode() if isinstance(claim[0], bytes) else claim[0]
        if verdict == "done":
            return "already_final"
        if verdict != "claimed":  # no record (delivered meanwhile), or another deliverer
            return "outboxed"
        record = json.loads(claim[1])
        outcome: Outcome = "outboxed"  # what an exception leaves: the record stays
        try:
            outcome = self._deliver_claimed(job_id, record, verify)
        finally:
            if outcome in ("written", "already_final"):  # done marker, record gone, unlock
                self._complete(keys=keys, args=[job_id, self.settings.final_marker_ttl_s, owner])
            else:
                self._release(keys=[keys[2]], args=[owner])
        if outcome == "written" and not quiet:
            log.info("final result written", job_id=job_id, status=record["body"]["status"])
        return outcome

    def _deliver_claimed(self, job_id: str, record: dict[str, Any], verify: bool) -> Outcome:
        """Under the job's lock: the backend status check (``verify``), then the PATCH."""
        tenant = record.get("tenant")
        try:
            current = self.backend.get_job(job_id, tenant) if verify else {}
            if current.get("status") in FINAL_STATUSES:
                log.info(
                    "job already final on the backend", job_id=job_id, status=current.get("status")
                )
                return "already_final"
            self.backend.patch_job(job_id, record["body"], tenant)
        except BackendUnavailable as e:
            log.warning(
                "backend unavailable; result kept in the outbox", job_id=job_id, error=str(e)
            )
            return "outboxed"
        except BackendRejected as e:
            self.redis.hset(DEAD_OUTBOX, job_id, json.dumps({**record, "error": str(e)}))
            self.redis.hdel(OUTBOX, job_id)
            log.error(
                "backend refused the final write; record kept in the dead outbox",
                job_id=job_id,
                error=str(e),
            )
            return "dead"
        return "written"

    # -- intermediate writes: best effort, never over a final status

    def update(self, job_id: str, body: dict[str, Any], *, tenant: str | None = None) -> bool:
        """A non-final PATCH (RUNNING, progress); skipped once the job is final."""
        if self.is_done(job_id) or self.redis.hexists(OUTBOX, job_id):
            return False
        try:
            self.backend.patch_job(job_id, body, tenant)
            return True
        except (BackendUnavailable, BackendRejected) as e:
            log.warning("intermediate update not written", job_id=job_id, error=str(e))
            return False

    # -- the flusher

    def flush(self, limit: int = 500) -> dict[str, int]:
        """Deliver what the outbox holds; returns counts by outcome."""
        counts: dict[str, int] = {}
        for job_id in list(self.redis.hkeys(OUTBOX))[:limit]:
            outcome = self.deliver(job_id)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def outbox_size(self) -> int:
        return int(self.redis.hlen(OUTBOX))


class Flusher(threading.Thread):
    """Every ``interval`` seconds: deliver the outbox, then run the other chores given."""

    def __init__(
        self, writeback: WriteBack, interval: float, chores: list[Callable[[], Any]] | None = None
    ) -> None:
        super().__init__(name="synapse-outbox-flusher", daemon=True)
        self.writeback = writeback
        self.interval = interval
        self.chores = chores or []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            for chore in [self.writeback.flush, *self.chores]:
                try:
                    outcome = chore()
                    if outcome:
                        log.info(
                            "housekeeping", chore=getattr(chore, "__name__", "?"), outcome=outcome
                        )
                except Exception as e:  # keep going whatever happened this round
                    log.warning(
                        "housekeeping failed",
                        chore=getattr(chore, "__name__", "?"),
                        error=f"{type(e).__name__}: {e}",
                    )

    def stop(self) -> None:
        self._stop_event.set()
