"""The write-back against a real Redis and a fake backend over real HTTP (issue 11).

The fake (tests/fake_backend.py) is scripted per test for what the local backend
cannot be told to do: refuse one given request, answer 2xx with HTML, dribble an
answer one byte at a time, accept a write it should refuse.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config.errors import BridgeError, is_transient
from config.settings import Settings
from tests.conftest import wait_for
from tests.fake_backend import FakeBackend
from worker import backend_api as api
from worker.writeback import DEAD_OUTBOX, DONE_PREFIX, LOCK_PREFIX, OUTBOX, WriteBack

TOKEN = "tok-service-0123456789abcdef"


class CountingRedis(redis.Redis):
    """A Redis client that notes the name of every command it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]).upper())
        return super().execute_command(*args, **options)


@pytest.fixture
def r(redis_url: str) -> Iterator[CountingRedis]:
    # A database of its own: the session's worker flushes the outbox of the main one.
    url = redis_url.rsplit("/", 1)[0] + "/14"
    client = CountingRedis.from_url(url, decode_responses=True)  # as the worker's
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def settings(timeout: float = 5.0) -> Settings:
    return Settings(access_token=TOKEN, backend_timeout_s=timeout)


def writeback(fake: FakeBackend, r: redis.Redis, timeout: float = 5.0) -> WriteBack:
    s = settings(timeout)
    return WriteBack(api.BackendAPI(s, base_url=fake.url), r, s)


def new_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def outbox_record(job_id: str, body: dict[str, Any], tenant: str | None = "acme") -> str:
    """An outbox record as ``finalize`` leaves it when the backend was down."""
    return json.dumps({"job_id": job_id, "tenant": tenant, "body": body, "at": time.time()})


def dead(r: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = r.hget(DEAD_OUTBOX, job_id)
    return json.loads(raw) if raw else None


def wire_size(body: dict[str, Any]) -> int:
    """The size of a JSON body as sent (compact, UTF-8)."""
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())


SUCCEEDED = {"status": "SUCCEEDED", "result": {"label": "cat"}}


# -- A2: one bad record never blocks the others; every failure is a BackendError


def test_one_undeliverable_record_does_not_block_the_rest(r: CountingRedis) -> None:
    with FakeBackend(TOKEN) as fake:
        wb = writeback(fake, r)
        good = [new_id("good") for _ in range(6)]
        bad_tenant, bad_answer, corrupt, busy = (new_id(p) for p in ("tn", "html", "rec", "busy"))
        for job_id in [*good, bad_tenant, bad_answer, busy]:
            fake.add_job(job_id)
            tenant = "acmé" if job_id == bad_tenant else "acme"  # cannot go in a header
            r.hset(OUTBOX, job_id, outbox_record(job_id, SUCCEEDED, tenant))
        r.hset(OUTBOX, corrupt, "{not json")
        fake.script(
            "GET", job_id=bad_answer, code=200, raw=b"<html>hi</html>", content_type="text/html"
        )
        fake.script("GET", job_id=busy, code=503)

        counts = wb.flush()

        for job_id in good:
            assert fake.status(job_id) == "SUCCEEDED"
            assert len(fake.applied(job_id)) == 1
        assert counts == {"written": 6, "dead": 3, "outboxed": 1}
        # The transient one waits in the outbox; the others are gone from it.
        assert r.hkeys(OUTBOX) == [busy]
        assert "tenant" in dead(r, bad_tenant)["error"]
        assert "not JSON" in dead(r, bad_answer)["error"]
        assert "unreadable" in dead(r, corrupt)["error"]
        assert not fake.entries(job_id=bad_tenant)  # refused before sending
        assert not list(r.scan_iter(LOCK_PREFIX + "*"))  # no lock left behind
        # The next round delivers the transient one.
        assert wb.flush() == {"written": 1}
        assert fake.status(busy) == "SUCCEEDED"


def test_backend_api_makes_every_non_transport_failure_a_non_transient_error(
    r: CountingRedis,
) -> None:
    with FakeBackend(TOKEN) as fake:
        backend = api.BackendAPI(settings(), base_url=fake.url)
        fake.add_job("j-1")
        calls = {
            "non-ASCII tenant": lambda: backend.get_job("j-1", "acmé"),
            "header injection": lambda: backend.get_job("j-1", "acme\r\nX-Evil: 1"),
            "dot segments": lambda: backend.get_job("../../admin"),
            "query in id": lambda: backend.get_job("j-1?x=1"),
            "slash in id": lambda: backend.get_job("a/b"),
            "NaN in body": lambda: backend.patch_job("j-1", {"result": float("nan")}, "acme"),
        }
        for what, call in calls.items():
            with pytest.raises(BridgeError) as e:
                call()
            assert isinstance(e.value, api.BackendError), what
            assert not is_transient(e.value), what
        assert not fake.log, "nothing invalid may reach the backend"

        fake.script("GET", code=200, raw=b"<html>proxy login</html>", content_type="text/html")
        fake.script("GET", code=200, raw=b"[1, 2]")
        fake.script("GET", code=400, raw=f'{{"detail": "Authorization: Token {TOKEN}"}}'.encode())
        for what in ("2xx not JSON", "2xx not a job", "4xx echoing the token"):
            with pytest.raises(api.BackendError) as e:
                backend.get_job("j-1", "acme")
            assert not is_transient(e.value), what
            assert TOKEN not in str(e.value), what

        # A `next` link httpx cannot even parse (InvalidURL, not a transport error).
        fake.script("GET", code=200, raw=b'{"results": [{"id": "j-1"}], "next": "http://[::1/"}')
        with pytest.raises(api.BackendError) as e:
            list(backend.iter_jobs(status="PENDING", action="inference"))
        assert not is_transient(e.value)

        fake.script("GET", code=503)
        with pytest.raises(api.BackendError) as e:
            backend.get_job("j-1", "acme")
        assert is_transient(e.value)
        assert backend.get_job("j-1", "acme")["status"] == "RUNNING"


def test_result_that_cannot_be_sent_fails_the_job_instead(r: CountingRedis) -> None:
    with FakeBackend(TOKEN) as fake:
        wb = writeback(fake, r)
        job_id = new_id()
        fake.add_job(job_id)
        outcome = wb.finalize(
            job_id, {"status": "SUCCEEDED", "result": {"score": float("nan")}}, tenant="acme"
        )
        assert outcome == "failed_instead"
        assert fake.status(job_id) == "FAILED"
        assert "could not be sent" in fake.jobs[job_id]["result"]["error"]
        assert dead(r, job_id) is None and wb.is_done(job_id)


# -- A4: a refused final write fails the job; a 409 means it is already final


def test_result_too_large_fails_the_job_with_its_size_in_bytes(r: CountingRedis) -> None:
    with FakeBackend(TOKEN, max_body_bytes=2000) as fake:
        wb = writeback(fake, r)
        job_id = new_id()
        fake.add_job(job_id)
        body = {"status": "SUCCEEDED", "result": {"text": "x" * 5000}}
        assert wb.finalize(job_id, body, tenant="acme") == "failed_instead"
        assert fake.status(job_id) == "FAILED"
        error = fake.jobs[job_id]["result"]["error"]
        assert "too large" in error and f"{wire_size(body)} bytes" in error
        assert dead(r, job_id) is None
        assert wb.is_done(job_id) and not r.hexists(OUTBOX, job_id)


def test_refused_failed_write_too_goes_to_the_dead_outbox_redacted(r: CountingRedis) -> None:
    with FakeBackend(TOKEN) as fake:
        wb = writeback(fake, r)
        job_id = new_id()
        fake.add_job(job_id)
        echo = f'{{"detail": "bad request; Authorization: Token {TOKEN}"}}'.encode()
        fake.script("PATCH", n=2, code=400, raw=echo)
        assert wb.finalize(job_id, SUCCEEDED, tenant="acme") == "dead"
        assert len(fake.entries("PATCH", job_id)) == 2  # the result, then FAILED
        assert fake.status(job_id) == "RUNNING"
        record = dead(r, job_id)
        assert record["body"] == SUCCEEDED
        assert "refused too" in record["error"]
        assert TOKEN not in r.hget(DEAD_OUTBOX, job_id)
        assert not wb.is_done(job_id) and not r.hexists(OUTBOX, job_id)


def test_conflict_on_the_final_patch_means_already_final_not_dead(r: CountingRedis) -> None:
    with FakeBackend(TOKEN) as fake:
        wb = writeback(fake, r)
        job_id = new_id()
        fake.add_job(job_id)
        # A user stops the job between our status read and our PATCH.
        fake.script("PATCH", before={"status": "STOPPED"})
        assert wb.finalize(job_id, SUCCEEDED, tenant="acme") == "already_final"
        assert fake.status(job_id) == "STOPPED"
        assert [e.code for e in fake.entries("PATCH", job_id)] == [409]  # no FAILED after it
        assert dead(r, job_id) is None
        assert wb.is_done(job_id) and not r.hexists(OUTBOX, job_id)


# -- A5: nothing over a final or stopped status; RUNNING never replaces a later state


def test_finalize_never_writes_over_a_final_or_stopped_job(r: CountingRedis) -> None:
    with FakeBackend(TOKEN, enforce=False) as fake:  # a backend that would accept it
        wb = writeback(fake, r)
        for status in ("STOPPED", "SUCCEEDED", "FAILED"):
            job_id = new_id()
            fake.add_job(job_id, status=status)
            assert wb.finalize(job_id, SUCCEEDED, tenant="acme") == "already_final"
            assert fake.status(job_id) == status
        assert not fake.entries("PATCH")
        with pytest.raises(TypeError):  # no caller can skip the status check any more
            wb.finalize(new_id(), SUCCEEDED, tenant="acme", verify=False)  # type: ignore[call-arg]


def test_running_mark_and_progress_only_move_forward(r: CountingRedis) -> None:
    with FakeBackend(TOKEN, enforce=False) as fake:  # the worker must not rely on 409
        wb = writeback(fake, r)
        running = {"status": "RUNNING", "meta": {"attempt": 1}}
        progress = {"progress_record": {"done": 1, "total": 4}}
        for status, body in [
            ("SUCCEEDED", running),
            ("STOPPED", running),
            ("FAILED", running),
            ("STOPPED", progress),
            ("SUCCEEDED", progress),
        ]:
            job_id = new_id()
            fake.add_job(job_id, status=status)
            assert wb.update(job_id, body, tenant="acme") is False, (status, body)
            assert fake.status(job_id) == status
        assert not fake.entries("PATCH")

        for status in ("PENDING", "QUEUED", "RUNNING"):
            job_id = new_id()
            fake.add_job(job_id, status=status)
            assert wb.update(job_id, running, tenant="acme") is True
            assert wb.update(job_id, progress, tenant="acme") is True
            assert fake.status(job_id) == "RUNNING"
            assert len(fake.applied(job_id)) == 2


# -- A14: update checks and locks in one round trip, and writes only under the lock


def test_update_checks_and_locks_in_one_round_trip(r: CountingRedis) -> None:
    with FakeBackend(TOKEN, enforce=False) as fake:
        wb = writeback(fake, r)
        job_id = new_id()
        fake.add_job(job_id)
        wb.update(new_id(), {"progress_record": {}}, tenant="acme")  # scripts loaded
        fake.log.clear()

        r.set(LOCK_PREFIX + job_id, "another-writer", px=30_000)
        r.commands.clear()
        assert wb.update(job_id, {"progress_record": {"done": 1}}, tenant="acme") is False
        assert r.commands == ["EVALSHA"]  # the done/outbox check and the lock, together
        assert not fake.log  # nothing written while another holds the job

        r.delete(LOCK_PREFIX + job_id)
        r.commands.clear()
        assert wb.update(job_id, {"progress_record": {"done": 2}}, tenant="acme") is True
        assert r.commands == ["EVALSHA", "EVALSHA"]  # claim, release
        assert not r.exists(LOCK_PREFIX + job_id)

        r.set(DONE_PREFIX + job_id, "1", ex=60)
        r.commands.clear()
        assert wb.update(job_id, {"progress_record": {"done": 3}}, tenant="acme") is False
        assert r.commands == ["EVALSHA"]
        assert len(fake.entries("PATCH")) == 1


# -- A10: every call has a total deadline; the lock outlives the worst write


def test_backend_call_has_a_total_deadline_against_a_dribbling_server(r: CountingRedis) -> None:
    with FakeBackend(TOKEN) as fake:
        backend = api.BackendAPI(settings(timeout=0.5), base_url=fake.url)
        fake.add_job("j-1")
        fake.script("GET", byte_delay_s=0.05)  # ~70 bytes: ~3.5 s, each gap far under 0.5 s
        started = time.monotonic()
        with pytest.raises(BridgeError) as e:
            backend.get_job("j-1", "acme")
        assert time.monotonic() - started < 1.5
        assert is_transient(e.value)
        assert backend.get_job("j-1", "acme")["status"] == "RUNNING"  # the next call is fine


def test_second_deliverer_never_patches_while_the_first_is_in_flight(r: CountingRedis) -> None:
    timeout = 0.5
    with FakeBackend(TOKEN) as fake:
        first, second = writeback(fake, r, timeout), writeback(fake, r, timeout)
        job_id = new_id()
        fake.add_job(job_id)
        body = {"status": "SUCCEEDED", "result": {"text": "y" * 150}}
        r.hset(OUTBOX, job_id, outbox_record(job_id, body))
        # The answer to the first PATCH is dribbled for ~16 s, one byte each 70 ms.
        fake.script("PATCH", byte_delay_s=0.07)
        window: dict[str, Any] = {}

        def deliver_first() -> None:
            window["start"] = time.monotonic()
            window["outcome"] = first.deliver(job_id)
            window["end"] = time.monotonic()

        thread = threading.Thread(target=deliver_first)
        thread.start()
        wait_for(lambda: fake.entries("PATCH"), timeout=10, what="the first PATCH")
        seconds: list[str] = []
        while thread.is_alive():
            seconds.append(second.deliver(job_id))
            thread.join(0.05)
        thread.join()
        patches = fake.entries("PATCH", job_id)
        assert all(p.started >= window["end"] for p in patches[1:]), "a PATCH overlapped"
        assert window["end"] - window["start"] < 3 * timeout + 1  # cut at its deadline
        assert window["outcome"] == "outboxed"  # no answer in time: the record stays

        wait_for(lambda: second.deliver(job_id) == "already_final" or second.is_done(job_id))
        patches = fake.entries("PATCH", job_id)
        assert all(p.started >= window["end"] for p in patches[1:]), "a PATCH overlapped"
        assert fake.status(job_id) == "SUCCEEDED"
        assert len(fake.applied(job_id)) == 1
        assert first.lock_s > 3 * timeout  # GET, PATCH and a FAILED PATCH fit in the lock
