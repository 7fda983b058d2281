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


class WriteBack:
    def __init__(
        self, backend: BackendAPI, r: redis.Redis, settings: Settings | None = None
    ) -> None:
        self.backend = backend
        self.redis = r
        self.settings = settings or get_settings()
        self._release = r.register_script(_RELEASE_LOCK)

    # -- the final write

    def is_done(self, job_id: str) -> bool:
        return bool(self.redis.exists(DONE_PREFIX + job_id))

    def pending(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(OUTBOX, job_id)
        return json.loads(raw) if raw else None

    def finalize(
        self, job_id: str, body: dict[str, Any], *, tenant: str | None = None, verify: bool = True
    ) -> Outcome:
        """Record the final body (first one wins), then try to deliver it now.

        ``verify=False`` skips the backend status check before the PATCH: for a caller
        that read the job's status itself moments ago (the task, at its start). Every
        later delivery (the flusher, a redelivered job) checks again.
        """
        if body.get("status") not in FINAL_STATUSES:
            raise ValueError(f"a final write needs a final status, got {body.get('status')!r}")
        record = {"job_id": job_id, "tenant": tenant, "body": body, "at": time.time()}
        self.redis.hsetnx(OUTBOX, job_id, json.dumps(record))
        return self.deliver(job_id, verify=verify)

    def deliver(self, job_id: str, *, verify: bool = True) -> Outcome:
        """Deliver the outbox record of ``job_id``, at most once."""
        lock_key, owner = LOCK_PREFIX + job_id, uuid.uuid4().hex
        lock_ms = int((self.settings.backend_timeout_s * 2 + 10) * 1000)
        if not self.redis.set(lock_key, owner, nx=True, px=lock_ms):
            return "outboxed"  # another deliverer holds it; the record stays until done
        try:
            return self._deliver_locked(job_id, verify)
        finally:
            self._release(keys=[lock_key], args=[owner])

    def _deliver_locked(self, job_id: str, verify: bool) -> Outcome:
        record = self.pending(job_id)
        if record is None:
            return "already_final" if self.is_done(job_id) else "outboxed"
        if self.is_done(job_id):
            self.redis.hdel(OUTBOX, job_id)
            return "already_final"
        tenant = record.get("tenant")
        try:
            current = self.backend.get_job(job_id, tenant) if verify else {}
            if current.get("status") in FINAL_STATUSES:
                self._mark_done(job_id)
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
        self._mark_done(job_id)
        log.info("final result written", job_id=job_id, status=record["body"]["status"])
        return "written"

    def _mark_done(self, job_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.set(DONE_PREFIX + job_id, "1", ex=self.settings.final_marker_ttl_s)
        pipe.hdel(OUTBOX, job_id)
        pipe.execute()

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
