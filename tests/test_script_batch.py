"""ScriptBatch: the Redis scripts of many threads, pipelined, each call answered as alone.

Against a real redis-server. A script that spins in Lua holds Redis (and so the
pipeline on the wire) for a while: the calls that arrive meanwhile must wait and go
together in the next pipeline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from devtools.redis_server import RedisServer
from worker.script_batch import ScriptBatch

ECHO = "return {KEYS[1], ARGV[1]}"
FAIL_ON_BAD = """
if ARGV[1] == 'bad' then return redis.error_reply('bad input for ' .. KEYS[1]) end
return ARGV[1]
"""
# Holds Redis for ARGV[1] ms: the pipeline it is in stays on the wire that long.
SPIN = """
local t = redis.call('time')
local start = t[1] * 1000 + t[2] / 1000
repeat t = redis.call('time') until t[1] * 1000 + t[2] / 1000 - start >= tonumber(ARGV[1])
return 'spun'
"""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.close()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=5)
    yield r
    r.close()


def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _in_threads(n: int, fn: Any) -> list[Any]:
    """``fn(i)`` in ``n`` threads started together; each one's return or exception."""
    out: list[Any] = [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    return out


def test_calls_that_arrive_while_a_pipeline_is_on_the_wire_go_together(
    client: redis.Redis,
) -> None:
    batch = ScriptBatch(client)
    spin, echo = batch.register_script(SPIN), batch.register_script(ECHO)
    spinning = threading.Thread(target=lambda: spin(keys=["s"], args=[300]))
    spinning.start()
    _until(lambda: batch.pipelines == 1)  # the spin is on the wire
    replies = _in_threads(32, lambda i: echo(keys=[f"k{i}"], args=[str(i)]))
    spinning.join(10)
    assert replies == [[f"k{i}", str(i)] for i in range(32)]
    # the spin's pipeline, then the 32 calls in one or two (one may land just before)
    assert batch.pipelines <= 3, batch.pipelines


def test_a_lone_call_goes_at_once_as_a_plain_script_call(client: redis.Redis) -> None:
    batch = ScriptBatch(client)
    echo = batch.register_script(ECHO)
    assert echo(keys=["a"], args=["1"]) == ["a", "1"]
    assert echo(keys=["b"], args=["2"]) == ["b", "2"]
    assert batch.pipelines == 2


def test_one_calls_script_error_is_only_that_calls(client: redis.Redis) -> None:
    batch = ScriptBatch(client)
    spin, check = batch.register_script(SPIN), batch.register_script(FAIL_ON_BAD)
    spinning = threading.Thread(target=lambda: spin(keys=["s"], args=[200]))
    spinning.start()
    _until(lambda: batch.pipelines == 1)
    replies = _in_threads(12, lambda i: check(keys=[f"k{i}"], args=["bad" if i == 5 else str(i)]))
    spinning.join(10)
    assert isinstance(replies[5], redis.ResponseError)
    assert "bad input for k5" in str(replies[5])
    assert [r for i, r in enumerate(replies) if i != 5] == [str(i) for i in range(12) if i != 5]


def test_a_script_redis_lost_is_loaded_again_in_a_pipeline(client: redis.Redis) -> None:
    batch = ScriptBatch(client)
    spin, echo = batch.register_script(SPIN), batch.register_script(ECHO)
    assert echo(keys=["x"], args=["0"]) == ["x", "0"]  # loaded once
    client.script_flush()  # as a Redis restart would
    spin(keys=["s"], args=[1])  # SPIN loaded again: the flush only cost ECHO
    spinning = threading.Thread(target=lambda: spin(keys=["s"], args=[200]))
    spinning.start()
    _until(lambda: batch.pipelines == 3)
    replies = _in_threads(8, lambda i: echo(keys=[f"k{i}"], args=[str(i)]))
    spinning.join(10)
    assert replies == [[f"k{i}", str(i)] for i in range(8)]


def test_redis_gone_fails_each_call_and_the_batch_works_again_after(
    server: RedisServer,
) -> None:
    r = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=2)
    batch = ScriptBatch(r)
    echo = batch.register_script(ECHO)
    assert echo(keys=["a"], args=["1"]) == ["a", "1"]
    server.kill()
    replies = _in_threads(8, lambda i: echo(keys=[f"k{i}"], args=[str(i)]))
    assert all(isinstance(x, redis.ConnectionError) for x in replies), replies
    server.start()
    replies = _in_threads(8, lambda i: echo(keys=[f"k{i}"], args=[str(i)]))
    assert replies == [[f"k{i}", str(i)] for i in range(8)]
    r.close()
