"""The retry policy (worker/retry.py): full jitter in [ceiling/2, ceiling], the ceiling
doubling from ``base_s`` up to ``cap_s``; a bound on the count; built from settings.
And the settler keeping to it (a real Redis, the fake backend, a fake Celery task)."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import redis
from celery.exceptions import Retry

from config import load_settings
from config.settings import Settings, get_settings
from tests.fake_backend import FakeBackend
from worker.app import create_app
from worker.message import DLQ, parse_job
from worker.pipeline import Job, TryAgain, monotonic_deadline
from worker.retry import RetryPolicy
from worker.services import Services
from worker.settle import Settler


class Edge(random.Random):
    """A random source that always draws one end of the range asked for."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return b if self.high else a


def test_every_delay_lies_in_half_to_full_ceiling_and_the_jitter_spans_it() -> None:
    policy = RetryPolicy(max_retries=6, base_s=0.5, cap_s=10.0)
    rng = random.Random(1234)
    for retries_done in range(12):
        ceiling = min(10.0, 0.5 * 2**retries_done)
        draws = [policy.delay(retries_done, rng) for _ in range(300)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws), (retries_done, ceiling)
        # Jitter, not a fixed delay: the draws cover the range (seeded, so reproducible).
        assert min(draws) < ceiling * 0.55 and max(draws) > ceiling * 0.95, retries_done


def test_the_ceiling_doubles_from_the_base_until_the_cap() -> None:
    policy = RetryPolicy(max_retries=20, base_s=0.25, cap_s=5.0)
    high, low = Edge(high=True), Edge(high=False)
    ceilings = [policy.delay(n, high) for n in range(10)]
    floors = [policy.delay(n, low) for n in range(10)]
    assert ceilings == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    assert floors == [c / 2 for c in ceilings]
    assert high.asked == [(c / 2, c) for c in ceilings]


def test_the_default_random_source_is_used_when_none_is_given() -> None:
    policy = RetryPolicy(base_s=2.0, cap_s=3.0)
    draws = {policy.delay(4) for _ in range(50)}
    assert all(1.5 <= d <= 3.0 for d in draws)
    assert len(draws) > 1  # drawn, not a constant


def test_a_delay_never_exceeds_the_cap_however_many_retries() -> None:
    policy = RetryPolicy(max_retries=10**9, base_s=1.0, cap_s=60.0)
    for retries_done in (6, 7, 30, 64, 200, 1000):
        assert 30.0 <= policy.delay(retries_done) <= 60.0, retries_done


def test_a_delay_is_capped_even_after_a_very_long_outage() -> None:
    policy = RetryPolicy(max_retries=10**9, base_s=5.0, cap_s=60.0)
    assert 30.0 <= policy.delay(1024) <= 60.0


def test_exhausted_once_the_retries_done_reach_the_bound() -> None:
    policy = RetryPolicy(max_retries=3)
    assert [policy.exhausted(n) for n in range(6)] == [False, False, False, True, True, True]
    assert RetryPolicy(max_retries=0).exhausted(0)  # no retry at all


def test_from_settings_takes_count_base_and_cap() -> None:
    s = Settings(retry_max=2, retry_base_s=0.3, retry_cap_s=1.2)
    assert RetryPolicy.from_settings(s) == RetryPolicy(max_retries=2, base_s=0.3, cap_s=1.2)


def test_from_settings_defaults_to_the_process_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_BRIDGE_RETRY_MAX", "9")
    monkeypatch.setenv("SYNAPSE_BRIDGE_RETRY_BASE", "0.125")
    monkeypatch.setenv("SYNAPSE_BRIDGE_RETRY_CAP", "7")
    get_settings.cache_clear()
    try:
        policy = RetryPolicy.from_settings()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert policy == RetryPolicy(max_retries=9, base_s=0.125, cap_s=7.0)
    assert policy.delay(10, Edge(high=True)) == 7.0


# --- the policy bounds the settler's retries (a fake Celery task records the retry)


class FakeTask:
    """What the settler needs of a bound Celery task: ``request`` and ``retry()``."""

    def __init__(self, retries: int) -> None:
        self.request = type("Request", (), {"id": "task-1", "retries": retries})()
        self.retried: list[dict[str, Any]] = []

    def retry(self, **kwargs: Any) -> Retry:
        self.retried.append(kwargs)
        raise Retry("retry scheduled", kwargs.get("exc"), when=kwargs.get("countdown"))


def test_the_settler_retries_within_the_policy_then_fails_the_job(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, key = "tok-service-retry-0123456789", "0Xr2mTOPw3Uk9cCSGBkfsg6wVhS2xhPK1d-5PNMOTGo="
    monkeypatch.setenv("SYNAPSE_BRIDGE_SEALING_KEY", key)
    monkeypatch.setenv("SYNAPSE_ACCESS_TOKEN", token)
    get_settings.cache_clear()
    url = redis_url.rsplit("/", 1)[0] + "/11"  # a database of its own
    r = redis.Redis.from_url(url)
    r.flushdb()
    with FakeBackend(token) as fake:
        s = load_settings(
            redis_url=url,
            broker_url=url,
            synapse_host=fake.url,
            access_token=token,
            retry_max=2,
            retry_base_s=0.5,
            retry_cap_s=0.75,
            backend_timeout_s=5,
        )
        svc = Services.build(s)
        try:
            settler = Settler(create_app(s), svc)
            msg = parse_job(
                {
                    "job_id": "job-retry-1",
                    "tenant": "acme",
                    "token": "tok-user-0123456789",
                    "model": 12,
                    "json": {},
                    "release": {"code": "image-classifier", "version": "1"},
                }
            )
            fake.add_job(msg.job_id, status="RUNNING")
            for retries, ceiling in ((0, 0.5), (1, 0.75)):
                task = FakeTask(retries)
                job = Job(msg, "task-1", retries + 1, time.time(), monotonic_deadline(30), 30)
                with pytest.raises(Retry):
                    settler.settle(task, job, TryAgain("ConnectionError: reset"), msg.wire())
                [call] = task.retried
                assert ceiling / 2 <= call["countdown"] <= ceiling
                assert call["kwargs"]["job"]["token"].startswith("sealed:v1:")
                assert fake.status(msg.job_id) == "RUNNING"
            task = FakeTask(2)  # the bound: no retry, the job FAILED and dead-lettered
            job = Job(msg, "task-1", 3, time.time(), monotonic_deadline(30), 30)
            assert settler.settle(task, job, TryAgain("ConnectionError: reset"), None) == "RETRY"
            assert task.retried == []
            assert fake.status(msg.job_id) == "FAILED"
            [write] = fake.applied(msg.job_id)
            assert "gave up after 3 attempts" in write.body["result"]["error"]
            letters = [m for k in r.keys(f"{DLQ}*") for m in r.lrange(k, 0, -1)]
            assert len(letters) == 1 and b"tok-user-0123456789" not in letters[0]
        finally:
            svc.close()
            r.flushdb()
            r.close()
            monkeypatch.undo()
            get_settings.cache_clear()
