"""A job's life (worker/pipeline.py ``process``) and the real steps (worker/steps.py)
against a real Redis and the fake backend over real HTTP (tests/fake_backend.py).

The steps in the first half are the test's own: each records what it was called with.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from config.errors import BridgeError, DeadlineExceeded
from config.settings import Settings
from tests.conftest import wait_for
from tests.fake_backend import FakeBackend
from worker.backend_api import BackendAPI
from worker.ledger import DUE, ENTRY_PREFIX, Ledger
from worker.message import JobMessage, parse_job
from worker.pipeline import (
    Deferred,
    Finished,
    Job,
    Outcome,
    PollState,
    Rejected,
    Requeued,
    Skipped,
    Step,
    TryAgain,
    monotonic_deadline,
    process,
    succeeded,
)
from worker.running_mark import RunningMarks
from worker.script_batch import ScriptBatch
from worker.steps import BackendStatus, MessageDeadline, RunningMark, SkipFinished, Started
from worker.writeback import DONE_PREFIX, LOCK_PREFIX, OUTBOX, WriteBack

PIPELINE_DB = 10  # a database of its own, emptied by each test
TOKEN = "tok-service-0123456789abcdef"
USER_TOKEN = "tok-user-pipeline-0123456789"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    url = redis_url.rsplit("/", 1)[0] + f"/{PIPELINE_DB}"
    client = redis.Redis.from_url(url, decode_responses=True)  # as the worker's
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    with FakeBackend(TOKEN, enforce=False) as backend:  # the worker must not rely on 409
        yield backend


def settings() -> Settings:
    return Settings(access_token=TOKEN, backend_timeout_s=5.0)


def writeback(fake: FakeBackend, r: redis.Redis) -> WriteBack:
    s = settings()
    return WriteBack(BackendAPI(s, base_url=fake.url), r, s)


def new_id() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


def message(job_id: str, *, batch: bool = False, **extra: Any) -> JobMessage:
    raw: dict[str, Any] = {
        "job_id": job_id,
        "tenant": "acme",
        "token": USER_TOKEN,
        "model": 12,
        "release": {"code": "image-classifier", "version": "1.0.0"},
        **extra,
    }
    if batch:
        raw["items"] = [{"x": 1}, {"x": 2}]
    else:
        raw["json"] = {"x": 1}
    return parse_job(raw)


def make_job(job_id: str | None = None, time_limit_s: float = 30.0, **kw: Any) -> Job:
    return Job(
        msg=message(job_id or new_id(), **kw),
        task_id="task-1",
        attempt=1,
        started=time.time(),
        deadline=monotonic_deadline(time_limit_s),
        time_limit_s=time_limit_s,
    )


# --- process(): the order of befores and afters, and what every exception becomes


class Recording(Step):
    """A step that notes its calls in a shared list; ``before`` may end the job or raise,
    ``after`` may raise."""

    def __init__(
        self,
        name: str,
        calls: list[tuple[str, ...]],
        outcome: Outcome | None = None,
        raise_before: BaseException | None = None,
        raise_after: BaseException | None = None,
    ) -> None:
        self.name = name
        self.calls = calls
        self.outcome = outcome
        self.raise_before = raise_before
        self.raise_after = raise_after
        self.after_outcomes: list[Outcome] = []

    def before(self, job: Job) -> Outcome | None:
        self.calls.append(("before", self.name))
        if self.raise_before is not None:
            raise self.raise_before
        return self.outcome

    def after(self, job: Job, outcome: Outcome) -> None:
        self.calls.append(("after", self.name))
        self.after_outcomes.append(outcome)
        if self.raise_after is not None:
            raise self.raise_after


def executor(calls: list[tuple[str, ...]], result: Outcome | BaseException) -> Callable:
    def execute(job: Job) -> Outcome:
        calls.append(("execute",))
        if isinstance(result, BaseException):
            raise result
        return result

    return execute


def test_befores_in_order_then_execute_then_afters_in_reverse() -> None:
    calls: list[tuple[str, ...]] = []
    steps = [Recording(n, calls) for n in "abc"]
    done = succeeded({"label": "cat"})
    outcome = process(make_job(), steps, executor(calls, done))
    assert outcome is done
    assert calls == [
        ("before", "a"),
        ("before", "b"),
        ("before", "c"),
        ("execute",),
        ("after", "c"),
        ("after", "b"),
        ("after", "a"),
    ]
    assert all(s.after_outcomes == [done] for s in steps)


def test_an_outcome_from_a_before_stops_the_rest_and_skips_execute() -> None:
    calls: list[tuple[str, ...]] = []
    skipped = Skipped("already final")
    a, b, c = Recording("a", calls), Recording("b", calls, outcome=skipped), Recording("c", calls)
    outcome = process(make_job(), [a, b, c], executor(calls, succeeded(1)))
    assert outcome is skipped
    # c's before never ran, so c gets no after; b, whose before ended the job, does.
    assert calls == [("before", "a"), ("before", "b"), ("after", "b"), ("after", "a")]
    assert a.after_outcomes == [skipped] and b.after_outcomes == [skipped]
    assert c.after_outcomes == []


def test_every_entered_step_gets_after_when_execute_raises() -> None:
    calls: list[tuple[str, ...]] = []
    steps = [Recording(n, calls) for n in "ab"]
    outcome = process(make_job(), steps, executor(calls, RuntimeError("boom")))
    assert isinstance(outcome, TryAgain)
    assert calls[-2:] == [("after", "b"), ("after", "a")]
    assert all(s.after_outcomes == [outcome] for s in steps)


def test_a_before_that_raises_gets_no_after_but_the_steps_before_it_do() -> None:
    calls: list[tuple[str, ...]] = []
    a = Recording("a", calls)
    b = Recording("b", calls, raise_before=ConnectionError("redis went away"))
    c = Recording("c", calls)
    outcome = process(make_job(), [a, b, c], executor(calls, succeeded(1)))
    assert isinstance(outcome, TryAgain) and "redis went away" in outcome.error
    assert calls == [("before", "a"), ("before", "b"), ("after", "a")]
    assert a.after_outcomes == [outcome]


def test_an_exception_in_after_changes_neither_the_outcome_nor_the_other_afters() -> None:
    calls: list[tuple[str, ...]] = []
    a = Recording("a", calls)
    b = Recording("b", calls, raise_after=RuntimeError("clean-up failed"))
    c = Recording("c", calls, raise_after=ConnectionError("also failed"))
    done = succeeded({"label": "dog"})
    outcome = process(make_job(), [a, b, c], executor(calls, done))
    assert outcome is done
    assert calls[-3:] == [("after", "c"), ("after", "b"), ("after", "a")]
    assert a.after_outcomes == [done]


def test_a_transient_exception_becomes_try_again_with_its_text() -> None:
    outcome = process(make_job(), [], executor([], ConnectionError("backend reset")))
    assert outcome == TryAgain("ConnectionError: backend reset")
    transient = BridgeError("overloaded", transient=True)
    assert process(make_job(), [], executor([], transient)) == TryAgain("BridgeError: overloaded")


def test_an_unexpected_exception_becomes_try_again_with_secrets_redacted() -> None:
    secret = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlX2hlcmU"
    outcome = process(make_job(), [], executor([], KeyError(f"lost {secret}")))
    assert isinstance(outcome, TryAgain)
    assert outcome.error.startswith("KeyError")
    assert "eyJhbGciOiJIUzI1NiJ9" not in outcome.error


def test_a_deadline_exceeded_is_a_failed_job_naming_the_time_limit() -> None:
    calls: list[tuple[str, ...]] = []
    step = Recording("a", calls)
    job = make_job(time_limit_s=2.5)
    outcome = process(job, [step], executor(calls, DeadlineExceeded("no time left")))
    assert isinstance(outcome, Finished)
    assert outcome.status == "FAILED"
    assert outcome.error == "time limit of 2.5s exceeded"
    assert step.after_outcomes == [outcome]
    # From a step's before too.
    late = Recording("late", [], raise_before=DeadlineExceeded("late"))
    outcome = process(make_job(time_limit_s=7), [late], executor([], succeeded(1)))
    assert isinstance(outcome, Finished) and outcome.error == "time limit of 7s exceeded"


def test_an_interruption_still_runs_the_afters_and_propagates() -> None:
    calls: list[tuple[str, ...]] = []
    step = Recording("a", calls)
    with pytest.raises(KeyboardInterrupt):
        process(make_job(), [step], executor(calls, KeyboardInterrupt()))
    assert step.after_outcomes == [TryAgain("interrupted")]


# --- the real steps: Started (the ledger entry goes, and SkipFinished, in one call)


def _recorded(r: redis.Redis, job: Job) -> None:
    """The job in the ledger, as ``submit`` leaves it (what the entry holds does not matter)."""
    Ledger(r, grace_s=60).record(job.job_id, {"job_id": job.job_id})
    assert r.exists(ENTRY_PREFIX + job.job_id) and r.zscore(DUE, job.job_id) is not None


def _ledger_cleared(r: redis.Redis, job: Job) -> bool:
    return not r.exists(ENTRY_PREFIX + job.job_id) and r.zscore(DUE, job.job_id) is None


def test_started_clears_the_ledger_entry_and_lets_a_new_job_run(
    fake: FakeBackend, r: redis.Redis
) -> None:
    job = make_job()
    _recorded(r, job)
    done = succeeded(1)
    step = Started(writeback(fake, r), ScriptBatch(r))
    assert process(job, [step], lambda j: done) is done
    assert _ledger_cleared(r, job)
    assert not fake.log


def test_started_skips_a_job_final_here_and_clears_its_ledger_entry(
    fake: FakeBackend, r: redis.Redis
) -> None:
    job = make_job()
    _recorded(r, job)
    r.set(DONE_PREFIX + job.job_id, "1", ex=60)
    ran: list[str] = []
    step = Started(writeback(fake, r), ScriptBatch(r))
    outcome = process(job, [step], lambda j: ran.append("x") or succeeded(1))
    assert outcome == Skipped("already final")
    assert not ran
    assert _ledger_cleared(r, job)


def test_started_delivers_a_pending_outbox_record(fake: FakeBackend, r: redis.Redis) -> None:
    wb = writeback(fake, r)
    job = make_job()
    _recorded(r, job)
    fake.add_job(job.job_id, status="RUNNING")
    body = {"status": "SUCCEEDED", "result": {"label": "cat"}}
    record = {"job_id": job.job_id, "tenant": "acme", "body": body, "at": time.time()}
    r.hset(OUTBOX, job.job_id, json.dumps(record))
    ran: list[str] = []
    outcome = process(job, [Started(wb, ScriptBatch(r))], lambda j: ran.append("x") or succeeded(2))
    assert isinstance(outcome, Skipped) and "outbox" in outcome.reason
    assert not ran
    assert [e.body for e in fake.applied(job.job_id)] == [body]
    assert _ledger_cleared(r, job)


# --- the real steps: SkipFinished


def test_skip_finished_skips_a_job_final_here(fake: FakeBackend, r: redis.Redis) -> None:
    wb = writeback(fake, r)
    job = make_job()
    fake.add_job(job.job_id, status="RUNNING")
    r.set(DONE_PREFIX + job.job_id, "1", ex=60)
    ran: list[str] = []
    outcome = process(job, [SkipFinished(wb)], lambda j: ran.append("x") or succeeded(1))
    assert outcome == Skipped("already final")
    assert not ran
    assert not fake.log  # not even a status read


def test_skip_finished_delivers_a_pending_outbox_record(fake: FakeBackend, r: redis.Redis) -> None:
    wb = writeback(fake, r)
    job = make_job()
    fake.add_job(job.job_id, status="RUNNING")
    body = {"status": "SUCCEEDED", "result": {"label": "cat"}}
    record = {"job_id": job.job_id, "tenant": "acme", "body": body, "at": time.time()}
    r.hset(OUTBOX, job.job_id, json.dumps(record))
    ran: list[str] = []
    outcome = process(job, [SkipFinished(wb)], lambda j: ran.append("x") or succeeded(2))
    assert isinstance(outcome, Skipped) and "outbox" in outcome.reason
    assert not ran  # never computed again
    assert fake.status(job.job_id) == "SUCCEEDED"
    assert [e.body for e in fake.applied(job.job_id)] == [body]
    assert not r.hexists(OUTBOX, job.job_id)
    assert wb.is_done(job.job_id)
    assert not r.exists(LOCK_PREFIX + job.job_id)


def test_skip_finished_lets_a_new_job_run(fake: FakeBackend, r: redis.Redis) -> None:
    job = make_job()
    done = succeeded(1)
    assert process(job, [SkipFinished(writeback(fake, r))], lambda j: done) is done
    assert not fake.log


# --- MessageDeadline


def test_message_deadline_fails_an_expired_job_and_lets_others_run() -> None:
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    ran: list[str] = []

    def execute(job: Job) -> Outcome:
        ran.append(job.job_id)
        return succeeded(1)

    expired = make_job(deadline=past)
    outcome = process(expired, [MessageDeadline()], execute)
    assert isinstance(outcome, Finished) and outcome.status == "FAILED"
    assert "deadline passed" in (outcome.error or "")
    assert ran == []
    for job in (make_job(deadline=future), make_job()):
        assert process(job, [MessageDeadline()], execute) == succeeded(1)
    assert len(ran) == 2


# --- BackendStatus


def test_backend_status_rejects_a_job_the_backend_does_not_know(
    fake: FakeBackend, r: redis.Redis
) -> None:
    step = BackendStatus(BackendAPI(settings(), base_url=fake.url))
    unknown = make_job(batch=True)
    outcome = process(unknown, [step], lambda j: succeeded(1))
    assert isinstance(outcome, Rejected) and "404" in outcome.reason
    other_tenant = make_job(batch=True)
    fake.add_job(other_tenant.job_id, status="PENDING", tenant="globex")
    outcome = process(other_tenant, [step], lambda j: succeeded(1))
    assert isinstance(outcome, Rejected)
    refused = make_job(batch=True)
    fake.add_job(refused.job_id, status="PENDING")
    fake.script("GET", job_id=refused.job_id, code=403)
    assert isinstance(process(refused, [step], lambda j: succeeded(1)), Rejected)


def test_backend_status_skips_a_job_final_on_the_backend(fake: FakeBackend) -> None:
    step = BackendStatus(BackendAPI(settings(), base_url=fake.url))
    for status in ("SUCCEEDED", "FAILED", "STOPPED"):
        job = make_job(batch=True)
        fake.add_job(job.job_id, status=status)
        outcome = process(job, [step], lambda j: succeeded(1))
        assert outcome == Skipped(f"job is {status} on the backend"), status


def test_backend_status_runs_the_job_when_it_cannot_tell_or_it_is_not_final(
    fake: FakeBackend,
) -> None:
    step = BackendStatus(BackendAPI(settings(), base_url=fake.url))
    done = succeeded({"items": 2})
    busy = make_job(batch=True)
    fake.add_job(busy.job_id, status="QUEUED")
    fake.script("GET", job_id=busy.job_id, code=503)
    assert process(busy, [step], lambda j: done) is done
    assert [e.code for e in fake.entries("GET", busy.job_id)] == [503]
    for status in ("PENDING", "QUEUED", "RUNNING"):
        job = make_job(batch=True)
        fake.add_job(job.job_id, status=status)
        assert process(job, [step], lambda j: done) is done, status


# --- RunningMark


def running_patches(fake: FakeBackend, job_id: str) -> list[Any]:
    return [e for e in fake.applied(job_id) if (e.body or {}).get("status") == "RUNNING"]


def test_running_mark_at_once_writes_running_with_the_attempt(
    fake: FakeBackend, r: redis.Redis
) -> None:
    wb = writeback(fake, r)
    job = make_job()
    fake.add_job(job.job_id, status="QUEUED")
    seen: list[str] = []

    def execute(j: Job) -> Outcome:
        seen.append(fake.status(j.job_id))  # RUNNING before the job runs
        return succeeded(1)

    process(job, [RunningMark(RunningMarks(after_s=0), wb)], execute)
    assert seen == ["RUNNING"]
    [patch] = running_patches(fake, job.job_id)
    assert patch.body["meta"]["attempt"] == 1 and patch.body["meta"]["task_id"] == "task-1"
    assert patch.tenant == "acme"


def test_running_mark_only_moves_a_job_forward(fake: FakeBackend, r: redis.Redis) -> None:
    wb = writeback(fake, r)
    for status in ("SUCCEEDED", "FAILED", "STOPPED"):
        job = make_job()
        fake.add_job(job.job_id, status=status)
        process(job, [RunningMark(RunningMarks(after_s=0), wb)], lambda j: succeeded(1))
        assert fake.status(job.job_id) == status
        assert not fake.entries("PATCH", job.job_id), status
    final_here = make_job()  # final in this fleet already: not even a read
    fake.add_job(final_here.job_id, status="RUNNING")
    r.set(DONE_PREFIX + final_here.job_id, "1", ex=60)
    process(final_here, [RunningMark(RunningMarks(after_s=0), wb)], lambda j: succeeded(1))
    assert not fake.entries(job_id=final_here.job_id)


def test_running_mark_writes_a_batch_at_once_whatever_the_delay(
    fake: FakeBackend, r: redis.Redis
) -> None:
    wb = writeback(fake, r)
    marks = RunningMarks(after_s=60)
    job = make_job(batch=True)
    fake.add_job(job.job_id, status="PENDING")
    seen: list[str] = []

    def execute(j: Job) -> Outcome:
        seen.append(fake.status(j.job_id))
        return succeeded({"items": 2})

    process(job, [RunningMark(marks, wb)], execute)
    assert seen == ["RUNNING"]
    assert len(running_patches(fake, job.job_id)) == 1
    assert marks.armed == 0


def test_a_deferred_job_is_marked_when_it_defers(fake: FakeBackend, r: redis.Redis) -> None:
    wb = writeback(fake, r)
    marks = RunningMarks(after_s=60)  # far off: only the deferral writes it
    job = make_job()
    fake.add_job(job.job_id, status="QUEUED")
    deferred = Deferred(PollState("ticket-1", time.time()))

    def execute(j: Job) -> Outcome:
        assert not fake.entries("PATCH", j.job_id)  # not marked while it runs briefly
        return deferred

    assert process(job, [RunningMark(marks, wb)], execute) is deferred
    assert fake.status(job.job_id) == "RUNNING"
    assert len(running_patches(fake, job.job_id)) == 1
    assert marks.armed == 0  # disarmed after writing: never written twice


def test_a_quick_job_is_never_marked_once_it_ended(fake: FakeBackend, r: redis.Redis) -> None:
    """The mark falls due after the job ended: disarmed, it never lands after the final
    write. A sentinel armed just after it on the same marks proves its turn came."""
    wb = writeback(fake, r)
    marks = RunningMarks(after_s=0.3)
    job = make_job()
    fake.add_job(job.job_id, status="QUEUED")
    done = succeeded({"label": "cat"})
    assert process(job, [RunningMark(marks, wb)], lambda j: done) is done
    final = {"status": "SUCCEEDED", "result": done.result}
    assert wb.finalize(job.job_id, final, tenant="acme") == "written"
    sentinel = threading.Event()
    marks.arm(sentinel.set)
    assert sentinel.wait(10), "the marks thread never reached the sentinel"
    assert marks.armed == 0
    assert [(e.body or {}).get("status") for e in fake.applied(job.job_id)] == ["SUCCEEDED"]
    assert fake.status(job.job_id) == "SUCCEEDED"


def test_a_slow_job_is_marked_running_once_before_its_final_write(
    fake: FakeBackend, r: redis.Redis
) -> None:
    wb = writeback(fake, r)
    marks = RunningMarks(after_s=0.05)
    job = make_job()
    fake.add_job(job.job_id, status="QUEUED")

    def execute(j: Job) -> Outcome:  # runs until its mark has landed
        wait_for(lambda: running_patches(fake, j.job_id), timeout=10, what="the RUNNING mark")
        return succeeded({"label": "cat"})

    outcome = process(job, [RunningMark(marks, wb)], execute)
    final = {"status": outcome.status, "result": outcome.result}
    assert wb.finalize(job.job_id, final, tenant="acme") == "written"
    statuses = [(e.body or {}).get("status") for e in fake.applied(job.job_id)]
    assert statuses == ["RUNNING", "SUCCEEDED"]
    assert marks.armed == 0


def test_the_real_steps_together_skip_a_delivered_job_before_marking_it(
    fake: FakeBackend, r: redis.Redis
) -> None:
    """As the run task orders them: a job whose result waits in the outbox is delivered
    and skipped, and no RUNNING is written over it."""
    wb = writeback(fake, r)
    job = make_job()
    fake.add_job(job.job_id, status="RUNNING")
    wb_body = {"status": "FAILED", "result": {"error": "x"}}
    r.hset(
        OUTBOX,
        job.job_id,
        json.dumps({"job_id": job.job_id, "tenant": "acme", "body": wb_body, "at": time.time()}),
    )
    steps = [SkipFinished(wb), MessageDeadline(), RunningMark(RunningMarks(after_s=0), wb)]
    outcome = process(job, steps, lambda j: Requeued("never"))
    assert isinstance(outcome, Skipped)
    assert [(e.body or {}).get("status") for e in fake.applied(job.job_id)] == ["FAILED"]
