"""Model admission against a real Redis: at most N models in flight, idle ones give way."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from worker import admission as adm
from worker.admission import ModelAdmission


@pytest.fixture
def r(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-admission-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(adm, "ACTIVE", f"{prefix}:active")  # apart from the worker's
    monkeypatch.setattr(adm, "INFLIGHT", f"{prefix}:inflight")
    yield client
    client.delete(f"{prefix}:active", f"{prefix}:inflight")
    client.close()


def wait_for(cond: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_models_beyond_the_capacity_wait(r: redis.Redis) -> None:
    a = ModelAdmission(r, capacity=2, idle_s=60)
    assert a.enter("t:1") and a.enter("t:2")
    assert a.enter("t:1")  # an active model always gets in
    assert not a.enter("t:3")
    a.leave("t:1")
    a.leave("t:1")
    assert not a.enter("t:3")  # t:1 has nothing in flight, but is not idle for 60 s yet


def test_an_idle_model_gives_way_and_a_busy_one_does_not(r: redis.Redis) -> None:
    a = ModelAdmission(r, capacity=2, idle_s=0.2)
    assert a.enter("t:busy") and a.enter("t:done")
    a.leave("t:done")
    time.sleep(0.3)  # both past the idle time; only t:done has nothing in flight
    assert a.enter("t:new")
    assert not a.enter("t:done")  # it left the active set: it waits now
    assert a.enter("t:busy")
    assert r.hget(adm.INFLIGHT, "t:busy") == b"2"


def test_the_longest_idle_model_goes_first(r: redis.Redis) -> None:
    a = ModelAdmission(r, capacity=2, idle_s=0.05)
    for key in ("t:old", "t:recent"):
        assert a.enter(key)
    a.leave("t:old")
    time.sleep(0.1)
    a.leave("t:recent")
    time.sleep(0.1)
    assert a.enter("t:new")
    assert set(r.hkeys(adm.ACTIVE)) == {b"t:recent", b"t:new"}


def test_a_model_left_running_by_a_dead_worker_goes_stale(r: redis.Redis) -> None:
    a = ModelAdmission(r, capacity=1, idle_s=0.05, stale_s=0.3)
    assert a.enter("t:orphan")  # never left: its worker died
    assert not a.enter("t:next")
    wait_for(lambda: a.enter("t:next"))
    assert r.hkeys(adm.ACTIVE) == [b"t:next"]


def test_capacity_must_be_positive(r: redis.Redis) -> None:
    with pytest.raises(ValueError, match="capacity"):
        ModelAdmission(r, capacity=0)
