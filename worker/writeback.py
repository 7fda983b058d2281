"""Write-back: each job's final write happens once, and no result is ever lost.

The final body is first recorded in an outbox (a Redis hash, ``HSETNX``: the first
computed result wins), then delivered under a per-job lock: the job's status is read
from the backend, a job already final or stopped there is left alone, else it is
PATCHed and marked done here. The worker never relies on the backend refusing a write.

- The backend cannot be reached (``is_transient``): the record stays in the outbox and
  the flusher delivers it later; the result is never recomputed because its write
  failed.
- The backend refuses the result (4xx, e.g. 413 for a result too large) or it cannot
  be sent (not strict JSON): the job is written FAILED with the reason instead.
- Anything else that makes a record undeliverable (a tenant that cannot go in a header,
  an answer that is not JSON, a refused FAILED write...): the record moves to the dead
  outbox with its reason, kept for people. One such record never holds up the others.

Intermediate writes (the RUNNING mark, progress) take the same lock and read the
status too: RUNNING is written only over PENDING/QUEUED/RUNNING, progress only while
the job is not final.

The lock outlives what runs under it: every backend call has a total deadline
(``backend_timeout_s``), the lock lasts ``_LOCK_CALLS`` of them plus a margin, and each
call under the lock is also cut where the lock would run out.
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

from config import Settings, get_settings, redact_text
from config.errors import BridgeError, is_transient
from worker.backend_api import (
    FINAL_STATUSES,
    STATUS_RANK,
    BackendAPI,
    BackendConflict,
    BackendError,
    BackendInvalidRequest,
    BackendRejected,
    BackendUnavailable,
)
from worker.script_batch import ScriptHost

log = structlog.get_logger("worker.writeback")

OUTBOX = "synapse:outbox"
DEAD_OUTBOX = "synapse:outbox:dead"
DONE_PREFIX = "synapse:final:"
LOCK_PREFIX = "synapse:final-lock:"

# written: the body is on the backend. already_final: the job was final or stopped
# there (nothing written). failed_instead: the backend refused the result and FAILED was
# written with the reason. outboxed: not delivered yet, the record waits in the outbox.
# dead: not deliverable, the record is in the dead outbox with its reason.
# unknown_job: the backend answered 403/404 for the job: the message is wrong (its
#   caller quarantines it); the record goes to the dead outbox like a dead one.
Outcome = Literal["written", "already_final", "failed_instead", "outboxed", "dead", "unknown_job"]
_SETTLED = ("written", "already_final", "failed_instead")

# A call under a job's lock is cut this long before the lock would run out
# (Settings.job_lock_s: three calls' deadlines plus a margin).
_FENCE_S = 2.0

# Done here, and the record waiting in the outbox ('' for none). KEYS: done marker,
# outbox. ARGV: job id.
_STATE = """
return {redis.call('exists', KEYS[1]), redis.call('hget', KEYS[2], ARGV[1]) or ''}
"""

_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# The claim: one round trip before the final PATCH (bench.redis_calls measures it).
# KEYS: outbox, done marker, lock. ARGV: job id, the record to add if none is there
# ('' adds none), lock owner, lock ms.
CLAIM_SCRIPT = """
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

# One round trip before an intermediate write: final here (done, or a result waiting in
# the outbox), locked by another writer, or the lock is ours.
# KEYS: outbox, done marker, lock. ARGV: job id, lock owner, lock ms.
_CLAIM_UPDATE = """
if redis.call('exists', KEYS[2]) == 1 or redis.call('hexists', KEYS[1], ARGV[1]) == 1 then
  return 'final'
end
if not redis.call('set', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return 'locked' end
return 'claimed'
"""

# One round trip after a settled delivery: done marker set, record gone, lock released
# (if still ours). KEYS: outbox, done marker, lock. ARGV: job id, marker ttl s, owner.
_COMPLETE = """
redis.call('set', KEYS[2], '1', 'EX', ARGV[2])
redis.call('hdel', KEYS[1], ARGV[1])
if redis.call('get', KEYS[3]) == ARGV[3] then redis.call('del', KEYS[3]) end
return 1
"""

# One round trip for an undeliverable record: into the dead outbox, out of the outbox,
# lock released (if still ours). KEYS: outbox, dead outbox, lock. ARGV: job id, dead
# record, owner.
_BURY = """
redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
redis.call('hdel', KEYS[1], ARGV[1])
if redis.call('get', KEYS[3]) == ARGV[3] then redis.call('del', KEYS[3]) end
return 1
"""


class _Undeliverable(BridgeError):
    """The record cannot be delivered, and FAILED could not be written in its place."""


def _reason(exc: BaseException) -> str:
    """Why a delivery failed, for the dead outbox and the log: short, never a token."""
    text = str(exc) if isinstance(exc, BridgeError) else f"{type(exc).__name__}: {exc}"
    return redact_text(text)[:500]


class WriteBack:
    """The final write of each job (``finalize``, ``deliver``, ``flush``) and the
    intermediate ones (``update``), on one backend and one Redis."""

    def __init__(
        self,
        backend: BackendAPI,
        r: redis.Redis,
        settings: Settings | None = None,
        *,
        scripts: ScriptHost | None = None,
    ) -> None:
        """``scripts``: where the per-job scripts run (a ``ScriptBatch`` pipelines the
        calls of many threads); by default each call alone on ``r``."""
        self.backend = backend
        self.redis = r
        self.settings = settings or get_settings()
        self.call_s = self.settings.backend_timeout_s
        self.lock_s = self.settings.job_lock_s  # above every call made under the lock
        host = scripts or r
        self._state = host.register_script(_STATE)
        self._release = host.register_script(_RELEASE_LOCK)
        self._claim = host.register_script(CLAIM_SCRIPT)
        self._claim_update = host.register_script(_CLAIM_UPDATE)
        self._complete = host.register_script(_COMPLETE)
        self._bury = host.register_script(_BURY)

    # -- what is known here

    def is_done(self, job_id: str) -> bool:
        """The job's final write was delivered (or found already final) by this fleet."""
        return bool(self.redis.exists(DONE_PREFIX + job_id))

    def state(self, job_id: str) -> tuple[bool, dict[str, Any] | None]:
        """``(is_done, pending record)`` in one round trip."""
        done, raw = self._state(keys=[DONE_PREFIX + job_id, OUTBOX], args=[job_id])
        return bool(int(done)), (json.loads(raw) if raw else None)

    # -- the final write

    def finalize(self, job_id: str, body: dict[str, Any], *, tenant: str | None = None) -> Outcome:
        """Record the final body (first one wins), then try to deliver it now.

        The backend's status is always read first, under the job's lock. The caller logs
        the outcome.
        """
        if body.get("status") not in FINAL_STATUSES:
            raise ValueError(f"a final write needs a final status, got {body.get('status')!r}")
        record = {"job_id": job_id, "tenant": tenant, "body": body, "at": time.time()}
        return self._deliver(job_id, json.dumps(record), quiet=True)

    def deliver(self, job_id: str) -> Outcome:
        """Deliver the outbox record of ``job_id``, at most once."""
        return self._deliver(job_id, "", quiet=False)

    def _deliver(self, job_id: str, new_record: str, *, quiet: bool) -> Outcome:
        keys = [OUTBOX, DONE_PREFIX + job_id, LOCK_PREFIX + job_id]
        owner = uuid.uuid4().hex
        # Taken before the claim: the lock, set after it, runs out no earlier than this.
        lock_until = time.monotonic() + self.lock_s
        claim = self._claim(keys=keys, args=[job_id, new_record, owner, int(self.lock_s * 1000)])
        verdict = claim[0].decode() if isinstance(claim[0], bytes) else claim[0]
        if verdict == "done":
            return "already_final"
        if verdict != "claimed":  # no record (delivered meanwhile), or another deliverer
            return "outboxed"
        raw = claim[1].decode() if isinstance(claim[1], bytes) else claim[1]
        outcome: Outcome = "outboxed"  # what an exception leaves: the record stays
        reason: str | None = None
        try:
            outcome, reason = self._attempt(job_id, raw, lock_until)
        finally:
            if outcome in _SETTLED:  # done marker, record gone, unlock
                self._complete(keys=keys, args=[job_id, self.settings.final_marker_ttl_s, owner])
            elif outcome in ("dead", "unknown_job"):
                self._bury(
                    keys=[OUTBOX, DEAD_OUTBOX, keys[2]],
                    args=[job_id, _dead_record(job_id, raw, reason or "?"), owner],
                )
            else:
                self._release(keys=[keys[2]], args=[owner])
        if outcome in ("dead", "unknown_job"):
            log.error(
                "final write not deliverable; record kept in the dead outbox",
                job_id=job_id,
                error=reason,
            )
        elif outcome == "written" and not quiet:
            log.info("final result written", job_id=job_id)
        return outcome

    def _attempt(self, job_id: str, raw: str, lock_until: float) -> tuple[Outcome, str | None]:
        """Under the job's lock: deliver one record; whatever happens, say what it was."""
        try:
            record = json.loads(raw)
            body, tenant = record["body"], record.get("tenant")
            if not isinstance(body, dict):
                raise TypeError("the body is not an object")
        except (ValueError, KeyError, TypeError) as e:
            return "dead", f"the outbox record is unreadable: {type(e).__name__}: {e}"[:500]
        try:
            return self._write_final(job_id, body, tenant, lock_until), None
        except Exception as e:  # one record's trouble is that record's, never the round's
            if is_transient(e):
                log.warning(
                    "backend unavailable; result kept in the outbox",
                    job_id=job_id,
                    error=_reason(e),
                )
                return "outboxed", None
            if isinstance(e, BackendRejected) and e.status_code in (403, 404):
                return "unknown_job", _reason(e)
            return "dead", _reason(e)

    def _write_final(
        self, job_id: str, body: dict[str, Any], tenant: str | None, lock_until: float
    ) -> Outcome:
        current = self.backend.get_job(job_id, tenant, deadline=self._deadline(lock_until))
        status = current["status"]
        if status in FINAL_STATUSES:
            if status == "STOPPED" and body.get("status") == "SUCCEEDED":
                log.info("job was stopped; its result is dropped", job_id=job_id)
            else:
                log.info("job already final on the backend", job_id=job_id, status=status)
            return "already_final"
        try:
            self.backend.patch_job(job_id, body, tenant, deadline=self._deadline(lock_until))
            return "written"
        except BackendConflict as e:
            log.info(
                "backend refused the write: job final or stopped there",
                job_id=job_id,
                status=e.current_status,
            )
            return "already_final"
        except (BackendRejected, BackendInvalidRequest) as e:
            # Not applied: the job is still `status`, not final; fail it with the reason.
            reason = _refusal(e)
        failed = {
            "status": "FAILED",
            "result": {"error": reason},
            "console_logs": [{"level": "error", "message": reason}],
        }
        try:
            self.backend.patch_job(job_id, failed, tenant, deadline=self._deadline(lock_until))
        except BackendConflict:
            return "already_final"
        except BackendError as e:
            if e.transient:
                raise
            raise _Undeliverable(f"{reason}; writing FAILED instead was refused too: {e}") from None
        log.error("backend refused the result; job written FAILED", job_id=job_id, error=reason)
        return "failed_instead"

    def _deadline(self, lock_until: float) -> float:
        """A call's deadline: its own, cut where the job's lock would run out."""
        now = time.monotonic()
        at = min(now + self.call_s, lock_until - _FENCE_S)
        if at <= now:
            raise BackendUnavailable("the job's lock would run out before a call could end")
        return at

    # -- intermediate writes: best effort, only forward, never over a final status

    def update(self, job_id: str, body: dict[str, Any], *, tenant: str | None = None) -> bool:
        """A non-final PATCH (RUNNING, progress), written only if it moves the job forward.

        One Redis round trip checks that no final write is done or pending here and takes
        the job's lock; then the backend's status is read and the PATCH made under it.
        False when skipped or not written (best effort: the final write follows anyway).
        """
        new = body.get("status")
        if new in FINAL_STATUSES or (new is not None and new not in STATUS_RANK):
            raise ValueError(f"an intermediate write needs a non-final status, got {new!r}")
        lock = LOCK_PREFIX + job_id
        owner = uuid.uuid4().hex
        lock_until = time.monotonic() + self.lock_s
        verdict = self._claim_update(
            keys=[OUTBOX, DONE_PREFIX + job_id, lock],
            args=[job_id, owner, int(self.lock_s * 1000)],
        )
        if (verdict.decode() if isinstance(verdict, bytes) else verdict) != "claimed":
            return False
        try:
            current = self.backend.get_job(job_id, tenant, deadline=self._deadline(lock_until))
            status = current["status"]
            if status in FINAL_STATUSES or status not in STATUS_RANK:
                return False
            if new is not None and STATUS_RANK[new] < STATUS_RANK[status]:
                return False
            self.backend.patch_job(job_id, body, tenant, deadline=self._deadline(lock_until))
            return True
        except BackendError as e:
            log.warning("intermediate update not written", job_id=job_id, error=_reason(e))
            return False
        finally:
            self._release(keys=[lock], args=[owner])

    # -- the flusher

    def flush(self, limit: int = 500) -> dict[str, int]:
        """Deliver what the outbox holds, each record on its own; counts by outcome."""
        counts: dict[str, int] = {}
        for key in list(self.redis.hkeys(OUTBOX))[:limit]:
            job_id = key.decode() if isinstance(key, bytes) else key
            try:
                outcome: str = self.deliver(job_id)
            except Exception as e:  # Redis trouble for this one: the next may pass
                log.warning("outbox record not delivered", job_id=job_id, error=_reason(e))
                outcome = "error"
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def _refusal(e: BackendError) -> str:
    """The FAILED reason for a result the backend refused or that could not be sent."""
    if e.status_code == 413:
        return (
            f"the result is too large for the backend: the write was {e.request_bytes} bytes (413)"
        )
    if isinstance(e, BackendInvalidRequest):
        return f"the result could not be sent: {_reason(e)}"
    return f"the backend refused the result: {_reason(e)}"


def _dead_record(job_id: str, raw: str, reason: str) -> str:
    """The dead outbox entry: the record as it was, with why it could not be delivered."""
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise TypeError
    except (ValueError, TypeError):
        record = {"job_id": job_id, "raw": raw}
    return json.dumps({**record, "error": redact_text(reason), "dead_at": time.time()})


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
