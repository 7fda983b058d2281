"""The worker's coalescer, in process: which jobs share a call, and whose answer is whose.

The serve side is a recording stand-in here (the grouping is what is under test); the
real coalesced call through Ray Serve is in ``test_coalesced_e2e``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from config.errors import DeadlineExceeded
from serve_runtime.errors import ServeClientError, ServeTimeout
from worker.coalesce import Coalescer

ROUTE = "/probe"


class Serve:
    """Records each call's bodies; a call blocks while ``gate`` is shut."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.tokens: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_call: Exception | None = None
        self.lock = threading.Lock()

    def _record(self, bodies: list[Any], token: Any) -> None:
        with self.lock:
            self.calls.append(bodies)
            self.tokens.append(token)
        assert self.gate.wait(10), "test gate never opened"
        if self.fail_call is not None:
            raise self.fail_call

    @staticmethod
    def _answer(body: Any) -> Any:
        if body.get("bad"):
            return ServeClientError(f"{ROUTE}: 422 bad input", status_code=422)
        return {"echo": body["n"]}

    def infer(self, route_prefix: str, body: Any, **kw: Any) -> Any:
        self._record([body], [kw["token"]])
        answer = self._answer(body)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def infer_many(self, route_prefix: str, bodies: list[Any], **kw: Any) -> list[Any]:
        self._record(bodies, kw["tokens"])
        return [self._answer(b) for b in bodies]


def until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def call(c: Coalescer, n: int, *, token: str = "tok-a", bad: bool = False, **kw: Any) -> Any:
    body = {"n": n, **({"bad": True} if bad else {})}
    return c.infer(ROUTE, body, model=7, token=token, tenant="acme", **kw)


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(64) as p:
        yield p


def test_a_lone_job_is_sent_at_once_as_a_single_call() -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=32, wait_s=30.0)  # a wait it must not take
    t0 = time.monotonic()
    assert call(c, 1) == {"echo": 1}
    assert time.monotonic() - t0 < 5
    assert serve.calls == [[{"n": 1}]]
    assert c._lanes == {}  # nothing kept once answered


def test_jobs_arriving_while_a_call_is_in_flight_share_the_next_call(pool: Any) -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=8, wait_s=30.0)
    serve.gate.clear()
    first = pool.submit(call, c, 0)
    until(lambda: len(serve.calls) == 1)
    rest = [pool.submit(call, c, n) for n in range(1, 21)]  # 20 more while it is busy
    until(lambda: len(serve.calls) == 3)  # two full groups of 8 went without waiting
    serve.gate.set()
    assert first.result(10) == {"echo": 0}
    assert [f.result(10) for f in rest] == [{"echo": n} for n in range(1, 21)]
    sizes = [len(c) for c in serve.calls]
    assert sizes[0] == 1 and sum(sizes) == 21 and max(sizes) == 8
    assert len(serve.calls) == 4  # the last 4 waited for the lane, then went together


def test_a_lane_keeps_at_most_its_calls_in_flight(pool: Any) -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=32, wait_s=30.0, max_calls=2)
    serve.gate.clear()
    first, second = pool.submit(call, c, 0), pool.submit(call, c, 1)
    until(lambda: len(serve.calls) == 2)  # two calls in flight: both went at once
    rest = [pool.submit(call, c, n) for n in range(2, 12)]
    until(lambda: sum(len(s.items) for s in [c._lanes[k].open for k in c._lanes] if s) == 10)
    assert len(serve.calls) == 2  # the others wait for a free call, not 30 s
    serve.gate.set()
    assert [f.result(5) for f in (first, second, *rest)] == [{"echo": n} for n in range(12)]
    assert sorted(len(x) for x in serve.calls) == [1, 1, 10]


def test_a_group_waits_at_most_the_coalescing_wait(pool: Any) -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=32, wait_s=0.05)
    serve.gate.clear()
    busy = pool.submit(call, c, 0)
    until(lambda: len(serve.calls) == 1)
    waiting = pool.submit(call, c, 1)  # the lane is busy: waits for company, 50 ms
    until(lambda: len(serve.calls) == 2, timeout_s=2)  # sent while the first still runs
    serve.gate.set()
    assert waiting.result(5) == {"echo": 1} and busy.result(5) == {"echo": 0}


def test_one_bad_item_fails_only_its_own_job(pool: Any) -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=4, wait_s=30.0)
    serve.gate.clear()
    pool.submit(call, c, 0)
    until(lambda: len(serve.calls) == 1)
    jobs = [pool.submit(call, c, n, bad=(n == 2)) for n in range(1, 5)]
    until(lambda: len(serve.calls) == 2)
    serve.gate.set()
    with pytest.raises(ServeClientError, match="422"):
        jobs[1].result(5)
    assert [jobs[i].result(5) for i in (0, 2, 3)] == [{"echo": 1}, {"echo": 3}, {"echo": 4}]


def test_a_call_failing_as_a_whole_reaches_every_job_of_its_group(pool: Any) -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=3, wait_s=30.0)
    serve.gate.clear()
    serve.fail_call = ServeTimeout(f"{ROUTE}: ReadTimeout")
    jobs = [pool.submit(call, c, n) for n in range(4)]  # one alone, then a group of 3
    until(lambda: len(serve.calls) == 2)
    serve.gate.set()
    for job in jobs:
        with pytest.raises(ServeTimeout):
            job.result(5)


def test_callers_share_a_call_each_with_its_own_token_models_never(pool: Any) -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=32, wait_s=0.2)
    serve.gate.clear()
    jobs = [pool.submit(call, c, n, token=f"tok-{n % 3}") for n in range(10)]
    jobs += [
        pool.submit(c.infer, ROUTE, {"n": 100}, model=8, token="tok-0", tenant="acme"),
        pool.submit(c.infer, ROUTE, {"n": 101}, model=7, token="tok-0", tenant="other"),
    ]
    until(lambda: sum(len(x) for x in serve.calls) == 12, timeout_s=5)
    serve.gate.set()
    for job in jobs:
        job.result(5)
    shared = False
    for bodies, tokens in zip(serve.calls, serve.tokens, strict=True):
        ns = [b["n"] for b in bodies]
        if any(n >= 100 for n in ns):
            assert len(ns) == 1  # another model, another tenant: a call of its own
            continue
        assert tokens == [f"tok-{n % 3}" for n in ns]  # each item its own caller
        shared = shared or len(set(tokens)) > 1
    assert shared  # callers of one model did share a call


def test_a_job_whose_time_runs_out_in_a_group_gets_its_time_limit_alone(pool: Any) -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=2, wait_s=30.0)
    serve.gate.clear()
    pool.submit(call, c, 0)
    until(lambda: len(serve.calls) == 1)
    long = pool.submit(call, c, 2, deadline=time.monotonic() + 30)  # leads the group
    until(lambda: sum(len(s.items) for s in [c._lanes[k].open for k in c._lanes] if s) == 1)
    short = pool.submit(call, c, 1, deadline=time.monotonic() + 0.3)
    with pytest.raises(DeadlineExceeded):
        short.result(5)
    serve.gate.set()
    assert long.result(5) == {"echo": 2}


def test_max_items_one_sends_every_job_alone() -> None:
    serve = Serve()
    c = Coalescer(serve, max_items=1, wait_s=30.0)
    assert [call(c, n) for n in range(3)] == [{"echo": n} for n in range(3)]
    assert serve.calls == [[{"n": 0}], [{"n": 1}], [{"n": 2}]]


def test_a_leader_that_breaks_leaves_no_job_waiting(pool: Any) -> None:
    class Broken(Serve):
        def infer_many(self, route_prefix: str, bodies: list[Any], **kw: Any) -> list[Any]:
            self._record(bodies, kw["tokens"])
            raise RuntimeError("a bug in the transport")

    serve = Broken()
    c = Coalescer(serve, max_items=3, wait_s=30.0)
    serve.gate.clear()
    pool.submit(call, c, 0)
    until(lambda: len(serve.calls) == 1)
    jobs = [pool.submit(call, c, n) for n in range(1, 4)]
    until(lambda: len(serve.calls) == 2)
    serve.gate.set()
    errors = []
    for job in jobs:
        with pytest.raises(Exception) as info:
            job.result(5)
        errors.append(type(info.value).__name__)
    # The leader meets the bug itself (its job retries); the others a transient error.
    assert sorted(errors) == ["RuntimeError", "ServeConnectionError", "ServeConnectionError"]


def test_an_endpoint_that_refuses_coalesced_calls_gets_single_calls(pool: Any) -> None:
    class Old(Serve):
        """A runtime from before coalescing: its endpoint is handed a list, and says 422."""

        def infer_many(self, route_prefix: str, bodies: list[Any], **kw: Any) -> list[Any]:
            self._record(bodies, kw["tokens"])
            raise ServeClientError(f"{route_prefix}: 422 body must be an object", status_code=422)

    serve = Old()
    c = Coalescer(serve, max_items=4, wait_s=30.0)
    serve.gate.clear()
    pool.submit(call, c, 0)
    until(lambda: len(serve.calls) == 1)
    jobs = [pool.submit(call, c, n) for n in range(1, 5)]
    until(lambda: len(serve.calls) == 2)
    serve.gate.set()
    assert [j.result(5) for j in jobs] == [{"echo": n} for n in range(1, 5)]
    assert sorted(len(x) for x in serve.calls) == [1, 1, 1, 1, 1, 4]  # one refusal, then alone
    serve.calls.clear()
    later = [pool.submit(call, c, n) for n in range(5, 13)]
    assert [j.result(5) for j in later] == [{"echo": n} for n in range(5, 13)]
    assert all(len(x) == 1 for x in serve.calls)  # the route is remembered


def test_a_malformed_coalesced_call_is_that_calls_error_not_a_fallback(pool: Any) -> None:
    class Strict(Serve):
        def infer_many(self, route_prefix: str, bodies: list[Any], **kw: Any) -> list[Any]:
            self._record(bodies, kw["tokens"])
            raise ServeClientError("400 bad count", status_code=400, code="invalid_items")

    serve = Strict()
    c = Coalescer(serve, max_items=2, wait_s=30.0)
    serve.gate.clear()
    pool.submit(call, c, 0)
    until(lambda: len(serve.calls) == 1)
    jobs = [pool.submit(call, c, n) for n in (1, 2)]
    until(lambda: len(serve.calls) == 2)
    serve.gate.set()
    for j in jobs:
        with pytest.raises(ServeClientError, match="bad count"):
            j.result(5)
    assert len(serve.calls) == 2
