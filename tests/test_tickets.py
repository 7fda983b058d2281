"""Deferred tickets without Ray: the store, and replicas sharing one in-process.

Two ``DeferredResults`` over one ``TicketStore`` are two replicas of an application;
the end-to-end tests (``test_tickets_e2e.py``) do the same on real Serve replicas.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from config import SettingsError, load_settings
from serve_runtime.deferred import DeferredResults, is_envelope
from serve_runtime.tickets import Answer, Caller, TicketStore
from worker.inference import ticket_lost
from worker.message import parse_job
from worker.pipeline import Finished, Job, Requeued

pytestmark = pytest.mark.anyio

ALICE = Caller.of("acme", 12, "tok-alice-0123456789")
BOB = Caller.of("acme", 12, "tok-bob-0123456789")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(cond: Any, timeout_s: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def status(answer: Any) -> str:
    return answer["status"] if is_envelope(answer) else "result"


class Work:
    """Deferred work that records when it ends and how often it ran."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs = 0
        self.ended: float | None = None

    async def __call__(self) -> dict[str, Any]:
        self.runs += 1
        await asyncio.sleep(self.seconds)
        self.ended = time.monotonic()
        return {"answer": 42}


async def as_alice() -> Caller:
    return ALICE


# --- (b) the keep time counts from completion


async def test_work_finishing_after_the_keep_time_answers_its_first_poll() -> None:
    keep = 0.4
    table = DeferredResults(0.05, keep_s=keep)
    work = Work(3 * keep)  # the ticket is older than the keep time when the work ends
    pending = await table.run(work(), as_alice)
    ticket = pending["ticket"]
    assert status(await table.poll(ticket, ALICE)) == "pending"

    async def answered() -> Any:
        out = await table.poll(ticket, ALICE)
        return out if status(out) != "pending" else None

    # The first answer that is not pending: the result, though the ticket is older
    # than the keep time by then.
    assert await until(answered, what="the work to end") == {"answer": 42}

    async def gone() -> bool:
        return status(await table.poll(ticket, ALICE)) == "not_found"

    await until(gone, what="the result to expire")
    assert work.ended is not None
    assert time.monotonic() - work.ended >= keep  # kept keep seconds from completion


async def test_the_store_keeps_an_answer_keep_seconds_from_its_arrival() -> None:
    store = TicketStore(0.3, lease_s=0.2)
    store.register("t1", "owner", ALICE)
    for _ in range(4):  # pending for longer than both the lease and the keep time
        await asyncio.sleep(0.1)
        store.heartbeat("owner", {"t1": ALICE})
    assert store.lookup("t1", ALICE).status == "pending"
    store.finish("t1", "owner", ALICE, Answer("done", payload=b"x"))
    finished = time.monotonic()
    assert store.lookup("t1", ALICE) == Answer("done", payload=b"x")

    async def gone() -> bool:
        return store.lookup("t1", ALICE).status == "not_found"

    await until(gone, what="the answer to expire")
    assert time.monotonic() - finished >= 0.3


async def _true(value: bool) -> bool:
    return value


# --- the store: leases, callers, bounds


async def test_a_pending_ticket_lapses_when_its_owner_stops_renewing_it() -> None:
    lease = 0.3
    store = TicketStore(60, lease_s=lease)
    store.register("t1", "owner", ALICE)
    for _ in range(6):  # renewed: pending well past one lease
        await asyncio.sleep(lease / 3)
        store.heartbeat("owner", {"t1": ALICE})
        assert store.lookup("t1", ALICE).status == "pending"
    last = time.monotonic()

    async def gone() -> bool:
        return store.lookup("t1", ALICE).status == "not_found"

    await until(gone, what="the lease to lapse")  # the owner died: not pending for ever
    assert time.monotonic() - last >= lease


def test_a_heartbeat_registers_again_what_the_store_lost() -> None:
    store = TicketStore(60)  # a store replica restarted: it knows nothing
    store.heartbeat("owner", {"t1": ALICE})
    assert store.lookup("t1", ALICE).status == "pending"
    store.finish("t1", "owner", ALICE, Answer("done", payload=b"r"))
    store.heartbeat("owner", {"t1": ALICE})  # a late heartbeat never undoes an answer
    assert store.lookup("t1", ALICE).status == "done"


def test_a_ticket_answers_only_its_caller() -> None:
    store = TicketStore(60)
    store.register("t1", "owner", ALICE)
    store.finish("t1", "owner", ALICE, Answer("done", payload=b"secret result"))
    assert store.lookup("t1", BOB).status == "not_found"
    assert store.lookup("t1", Caller.of("acme", 13, "tok-alice-0123456789")).status == ("not_found")
    assert store.lookup("t1", Caller.of("globex", 12, "tok-alice-0123456789")).status == (
        "not_found"
    )
    assert store.lookup("t1", ALICE).payload == b"secret result"


def test_the_oldest_finished_tickets_go_first_at_the_bound() -> None:
    store = TicketStore(60, max_tickets=3)
    store.register("p1", "owner", ALICE)
    for t in ("f1", "f2"):
        store.finish(t, "owner", ALICE, Answer("done", payload=b"r"))
    store.register("p2", "owner", ALICE)  # four tickets: f1, the oldest finished, goes
    assert [store.lookup(t, ALICE).status for t in ("p1", "f1", "f2", "p2")] == [
        "pending",
        "not_found",
        "done",
        "pending",
    ]
    assert store.stats()["dropped"] == 1


def test_results_are_bounded_in_size_and_in_total() -> None:
    store = TicketStore(60, max_result_bytes=100, max_bytes=250)
    store.finish("big", "owner", ALICE, Answer("done", payload=b"x" * 101))
    big = store.lookup("big", ALICE)
    assert big.status == "failed" and "over the 100 bytes" in (big.error or "")
    for t in ("a", "b", "c"):
        store.finish(t, "owner", ALICE, Answer("done", payload=b"x" * 100))
    assert store.lookup("a", ALICE).status == "not_found"  # the oldest, over 250 bytes
    assert store.stats()["bytes"] <= 250


# --- two replicas sharing one store


async def test_a_ticket_is_answered_by_a_replica_that_did_not_make_it() -> None:
    store = TicketStore(60)
    owner = DeferredResults(0.05, keep_s=60, shared=store)
    other = DeferredResults(0.05, keep_s=60, shared=store)
    work = Work(0.3)
    ticket = (await owner.run(work(), as_alice))["ticket"]
    assert status(await other.poll(ticket, ALICE)) == "pending"

    async def answered() -> Any:
        out = await other.poll(ticket, ALICE)
        return out if status(out) == "result" else None

    assert await until(answered, what="the result on the other replica") == {"answer": 42}
    assert await owner.poll(ticket, ALICE) == {"answer": 42}
    assert status(await other.poll(ticket, BOB)) == "not_found"
    assert status(await owner.poll(ticket, BOB)) == "not_found"
    assert work.runs == 1
    assert owner.stats["polls_here"] == 1  # alice's: no hop; bob's went on to the store
    assert other.stats["polls_here"] == 0 and other.stats["polls_shared"] >= 3


async def test_a_failure_is_shared_too() -> None:
    store = TicketStore(60)
    owner = DeferredResults(0.05, keep_s=60, shared=store)
    other = DeferredResults(0.05, keep_s=60, shared=store)

    async def boom() -> None:
        await asyncio.sleep(0.2)
        raise ValueError("no luck")

    ticket = (await owner.run(boom(), as_alice))["ticket"]

    async def failed() -> Any:
        out = await other.poll(ticket, ALICE)
        return out if status(out) == "failed" else None

    assert (await until(failed, what="the failure"))["error"] == "ValueError: no luck"


async def test_a_caller_that_cannot_be_bound_cancels_the_work() -> None:
    table = DeferredResults(0.05, keep_s=60)
    work = Work(5)

    async def refused() -> Caller:
        raise PermissionError("no token")

    task = asyncio.ensure_future(work())
    with pytest.raises(PermissionError):
        await table.run(task, refused)
    await until(lambda: _true(task.done()), what="the work cancelled")
    assert task.cancelled()


# --- the settings


@pytest.mark.parametrize(
    ("env", "value"),
    [("deferred_keep_s", 0), ("deferred_keep_s", -1), ("deferred_resubmits", -1)],
)
def test_deferred_settings_are_validated(env: str, value: float) -> None:
    with pytest.raises(SettingsError):
        load_settings(**{env: value})


def test_deferred_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_BRIDGE_DEFERRED_KEEP", "2.5")
    s = load_settings()
    assert s.deferred_keep_s == 2.5 and s.deferred_resubmits == 3


# --- the worker: a lost ticket sends the job again, within the bound


def test_a_lost_ticket_counts_resubmissions_then_fails_naming_the_bound() -> None:
    def lost(action: str) -> float:
        name = "synapse_deferred_tickets_lost_total"
        return REGISTRY.get_sample_value(name, {"action": action}) or 0.0

    raw = {
        "job_id": "job-lost-1",
        "tenant": "acme",
        "token": "tok-alice-0123456789",
        "model": 12,
        "json": {"x": 1},
        "release": {"checksum": "probe"},
    }
    job = Job(msg=parse_job(raw), task_id=None, attempt=1, started=0, deadline=0, time_limit_s=1)
    before = lost("resubmitted"), lost("failed")
    for n in (1, 2):
        outcome = ticket_lost(job, bound=2, waited=0.0)
        assert outcome == Requeued(outcome.reason, resubmit=True)
        assert job.msg.resubmits == n
        wire = job.msg.model_dump(mode="json", by_alias=True, exclude_none=True)
        job.msg = parse_job({**wire, "token": raw["token"]})  # what the next message carries
    outcome = ticket_lost(job, bound=2, waited=0.0)
    assert isinstance(outcome, Finished) and outcome.status == "FAILED"
    assert "lost 3 times" in (outcome.error or "")
    assert "SYNAPSE_BRIDGE_DEFERRED_RESUBMITS=2" in (outcome.error or "")
    assert (lost("resubmitted") - before[0], lost("failed") - before[1]) == (2, 1)
    first = parse_job(raw).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert "resubmits" not in first  # a first message is as before
