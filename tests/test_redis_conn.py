"""The worker's Redis client under as many threads as the worker runs.

redis-py 8's pool holds at most 100 connections by default and raises
``MaxConnectionsError`` (before its retry even starts) to the 101st caller at once:
a worker with 192 threads, each in a Redis call, had calls fail for no fault of
Redis's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from devtools.redis_server import RedisServer
from worker.redis_conn import connect_redis


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.close()


def test_more_threads_in_redis_calls_than_the_pool_holds_all_get_answers(
    server: RedisServer,
) -> None:
    r = connect_redis(server.url)  # sized as by default: 100
    threads, errors, answers = 150, [], []
    start = threading.Barrier(threads)

    def call() -> None:
        start.wait()
        try:  # holds its connection 0.3 s: the calls overlap
            answers.append(r.blpop(["nothing-here"], timeout=0.3))
        except Exception as e:
            errors.append(e)

    pool = [threading.Thread(target=call) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert not errors, f"{len(errors)} calls failed: {errors[0]!r}"
    assert answers == [None] * threads
    r.close()


def test_the_pool_is_sized_for_the_worker_threads(server: RedisServer) -> None:
    r = connect_redis(server.url, max_connections=250)
    assert r.connection_pool.max_connections == 250
    assert r.ping()
    assert r.set("k", "v") and r.get("k") == "v"  # decoded, as the worker expects
    r.close()
