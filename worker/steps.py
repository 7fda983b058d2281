"""The steps around a job's execution (see ``worker.pipeline``), one concern each."""

from __future__ import annotations

import json
import os
import socket
from functools import partial
from typing import Any

import structlog

from config.errors import is_transient
from serve_runtime.tokens import ModelKey
from worker.admission import ModelAdmission
from worker.backend_api import FINAL_STATUSES, BackendAPI, BackendError, BackendInvalidRequest
from worker.ledger import DUE, ENTRY_PREFIX
from worker.pipeline import Deferred, Job, Outcome, Rejected, Requeued, Skipped, Step, failed
from worker.running_mark import Mark, RunningMarks
from worker.script_batch import ScriptHost
from worker.writeback import DONE_PREFIX, OUTBOX, WriteBack

log = structlog.get_logger("worker.steps")
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class SkipFinished(Step):
    """A job final here, or whose result waits in the outbox, is never computed again."""

    def __init__(self, writeback: WriteBack) -> None:
        self.writeback = writeback

    def before(self, job: Job) -> Outcome | None:
        done, pending = self._state(job.job_id)
        if done:
            return Skipped("already final")
        if pending is not None:
            self.writeback.deliver(job.job_id)
            return Skipped("result computed before; delivered from the outbox")
        return None

    def _state(self, job_id: str) -> tuple[bool, dict[str, Any] | None]:
        return self.writeback.state(job_id)


# The ledger's ``started`` and the write-back's ``state`` in one script.
# KEYS: ledger entry, ledger due set, done marker, outbox. ARGV: job id.
_START = """
redis.call('del', KEYS[1])
redis.call('zrem', KEYS[2], ARGV[1])
return {redis.call('exists', KEYS[3]), redis.call('hget', KEYS[4], ARGV[1]) or ''}
"""


class Started(SkipFinished):
    """A job's first step: it started, so its ledger entry goes (from here the broker's
    redelivery covers it, ``worker.ledger``); and as ``SkipFinished``, in the same
    round trip: the ledger's call alone was 8% of the worker's GIL time in a W2 profile."""

    def __init__(self, writeback: WriteBack, scripts: ScriptHost) -> None:
        super().__init__(writeback)
        self._start = scripts.register_script(_START)

    def _state(self, job_id: str) -> tuple[bool, dict[str, Any] | None]:
        keys = [ENTRY_PREFIX + job_id, DUE, DONE_PREFIX + job_id, OUTBOX]
        done, raw = self._start(keys=keys, args=[job_id])
        return bool(int(done)), (json.loads(raw) if raw else None)


class BackendStatus(Step):
    """Before long work (a batch): a job final or stopped on the backend is skipped, and
    a job the backend does not know, or not for this tenant, is a wrong message.

    Single jobs skip this read: the final write checks the status anyway, and one
    backend request per job less is worth more than the rare wasted inference.
    """

    def __init__(self, backend: BackendAPI) -> None:
        self.backend = backend

    def before(self, job: Job) -> Outcome | None:
        try:
            current = self.backend.get_job(job.job_id, job.msg.tenant)
        except BackendError as e:
            if is_transient(e):
                return None  # cannot tell: run; the final write checks again
            if isinstance(e, BackendInvalidRequest) or e.status_code in (403, 404):
                return Rejected(f"the backend refused job {job.job_id}: {e.status_code or e}")
            raise
        if current.get("status") in FINAL_STATUSES:
            return Skipped(f"job is {current.get('status')} on the backend")
        return None


class MessageDeadline(Step):
    """A job whose ``deadline`` passed while it waited is failed, not run."""

    def before(self, job: Job) -> Outcome | None:
        if job.msg.expired():
            return failed("deadline passed before the job could run")
        return None


class Admission(Step):
    """At most N models in flight across the workers, served fairly (``worker.admission``).

    A refused job goes back to the queue keeping its arrival time, so its model keeps
    its place in the waiting line; every job's lease ends in ``after``.
    """

    def __init__(self, admission: ModelAdmission, turn_wait_s: float) -> None:
        self.admission = admission
        self.turn_wait_s = turn_wait_s

    @staticmethod
    def key(job: Job) -> str:
        return str(ModelKey(tenant=job.msg.tenant, model=str(job.msg.model)))

    def before(self, job: Job) -> Outcome | None:
        arrived = job.msg.submitted_at or job.started
        if self.admission.wait_for_turn(
            self.key(job), job.job_id, arrived, timeout_s=self.turn_wait_s
        ):
            return None
        if job.msg.submitted_at is None:  # the place in line travels with the message
            job.msg = job.msg.model_copy(update={"submitted_at": arrived})
        return Requeued("model not admitted yet")

    def after(self, job: Job, outcome: Outcome) -> None:
        self.admission.leave(self.key(job), job.job_id)


class RunningMark(Step):
    """RUNNING on the backend for jobs still running after a while (``running_mark``).

    A batch is marked at once (progress writes follow); a deferred job is marked when
    it defers (it runs on the replica for longer than this task). The mark is disarmed
    in ``after``, so it never lands after the final write.
    """

    def __init__(self, marks: RunningMarks, writeback: WriteBack) -> None:
        self.marks = marks
        self.writeback = writeback
        self._marks: dict[int, Mark] = {}

    def before(self, job: Job) -> Outcome | None:
        body = {
            "status": "RUNNING",
            "meta": {"attempt": job.attempt, "task_id": job.task_id, "worker": WORKER_NAME},
        }
        write = partial(self.writeback.update, job.job_id, body, tenant=job.msg.tenant)
        mark = self.marks.arm(write)
        if job.msg.is_batch:
            mark.write_now()
        self._marks[id(job)] = mark
        return None

    def after(self, job: Job, outcome: Outcome) -> None:
        mark = self._marks.pop(id(job), None)
        if mark is None:
            return
        if isinstance(outcome, Deferred):
            mark.write_now()
        mark.disarm()
