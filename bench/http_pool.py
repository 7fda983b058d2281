"""The client's CPU per request through one shared httpx client, by thread count (issue 13).

    python -m bench.http_pool [--threads 16,64,192] [--clients single,sharded,shared,...]
                              [--connections 100] [--delay-ms 20] [--seconds 3]
                              [--repeats 3] [--count]

A trivial ASGI app runs under uvicorn in a subprocess (it answers a small JSON body
after ``--delay-ms``, like a serve call that takes a while). For each client kind and
thread count, that many threads share ONE httpx client sized like the worker's
(``max_connections`` = keep-alive = ``--connections``) and post in a loop; after a
warm-up, the run counts requests and this process's CPU time (all threads), and
reports CPU ms per request: the median of ``--repeats`` runs, the kinds alternating.
``--count`` also counts the connection-state checks httpcore's pool makes per request
(a figure the machine's load does not move; the counting costs CPU itself).
``single`` is a plain ``httpx.Client`` (what the worker had first); ``sharded`` (or
``sharded:N``, N connections per shard) is a plain ``httpx.Client`` on
``serve_runtime.http_pool.ShardedTransport``; ``shared`` is that transport on
``serve_runtime.shared_client.SharedClient``, which keeps no cookies: the worker's
client now. ``async`` is one ``httpx.AsyncClient`` on one event loop, with as many tasks
as threads: what an asyncio core in the worker would send its calls through;
``aiohttp`` is the same with an ``aiohttp.ClientSession`` (installed with ray[serve]),
for the cost of an asyncio core on a client other than httpx; ``aiohttp-threads`` is
that session on one event-loop thread, posted to by as many threads as the others
have, each waiting on its request's future: the worker's threads kept, its client
swapped.

To see where the time goes, profile one configuration (the server is another process
and is not sampled)::

    py-spy record --native --format raw -o /tmp/pool.txt -- \\
        .venv/bin/python -m bench.http_pool --threads 192 --clients single --seconds 6
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import httpcore
import httpx

from serve_runtime.http_pool import SHARD_CONNECTIONS, ShardedTransport
from serve_runtime.shared_client import SharedClient

BODY = json.dumps({"result": [0.1, 0.2, 0.7]}).encode()


async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Reads the request, waits ``BENCH_DELAY_MS``, answers a small JSON body."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    delay = float(os.environ.get("BENCH_DELAY_MS", "0")) / 1000
    if delay:
        await asyncio.sleep(delay)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(delay_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.http_pool:app", "--port", str(port)]
    cmd += ["--log-level", "warning", "--no-access-log", "--backlog", "4096"]
    env = {**os.environ, "BENCH_DELAY_MS": str(delay_ms)}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the bench server did not start in 30 s")


def make_client(kind: str, connections: int) -> httpx.Client:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(30.0)
    if kind == "single":
        return httpx.Client(timeout=timeout, limits=limits)
    if kind.startswith("sharded"):  # "sharded" or "sharded:N", N connections per shard
        per = int(kind.partition(":")[2] or SHARD_CONNECTIONS)
        return httpx.Client(timeout=timeout, transport=ShardedTransport(limits, per_shard=per))
    if kind == "shared":
        return SharedClient(timeout=timeout, transport=ShardedTransport(limits))
    raise ValueError(f"unknown client kind {kind!r}")


def open_connections(client: httpx.Client | httpx.AsyncClient) -> int:
    """The connections the client's pool (or its shards) holds now."""
    transport = client._transport
    if isinstance(transport, ShardedTransport):
        return sum(len(shard.connections) for shard in transport.pool.shards)
    pool = getattr(transport, "_pool", None)
    pools = (httpcore.ConnectionPool, httpcore.AsyncConnectionPool)
    return len(pool.connections) if isinstance(pool, pools) else -1


# The connection-state methods httpcore's pool calls while it scans its connections.
CHECKS = ("is_idle", "is_available", "is_closed", "has_expired", "can_handle_request")


@contextlib.contextmanager
def counting_checks() -> Iterator[itertools.count[int]]:
    """Counts every call of ``CHECKS`` on httpcore's connections (``next`` reads it)."""
    calls = itertools.count()
    saved = {name: getattr(httpcore.HTTPConnection, name) for name in CHECKS}

    def wrap(method: Callable[..., bool]) -> Callable[..., bool]:
        def counted(self: httpcore.HTTPConnection, *args: Any) -> bool:
            next(calls)
            return method(self, *args)

        return counted

    for name, method in saved.items():
        setattr(httpcore.HTTPConnection, name, wrap(method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(httpcore.HTTPConnection, name, method)


def run_one(
    kind: str, threads: int, url: str, connections: int, seconds: float, count: bool = False
) -> dict[str, Any]:
    if kind == "async":
        return asyncio.run(_run_async(threads, url, connections, seconds))
    if kind == "aiohttp":
        return asyncio.run(_run_aiohttp(threads, url, connections, seconds))
    if kind == "aiohttp-threads":
        return _run_aiohttp_threads(threads, url, connections, seconds)
    with counting_checks() if count else contextlib.nullcontext() as calls:
        return _run(kind, threads, url, connections, seconds, calls)


BODY_SENT = {"inputs": [1, 2, 3]}


def _threads(
    threads: int,
    seconds: float,
    post: Callable[[], Any],
    failure: type[Exception],
    probe: Callable[[], int] | None = None,
) -> tuple[int, list[str], float, float, int | None]:
    """``threads`` threads calling ``post`` in a loop; after a warm-up (connections
    opened, threads running), the requests, errors, CPU and wall seconds of a window of
    ``seconds``, and how far ``probe`` moved over it."""
    stop, counting = threading.Event(), threading.Event()
    done = [0] * threads
    errors: list[str] = []

    def loop(i: int) -> None:
        while not stop.is_set():
            try:
                post()
                if counting.is_set():
                    done[i] += 1
            except failure as e:
                errors.append(type(e).__name__)

    pool = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    time.sleep(min(2.0, seconds / 2))
    counting.set()
    cpu0, wall0 = time.process_time(), time.monotonic()
    probe0 = probe() if probe is not None else 0
    time.sleep(seconds)
    probe1 = probe() if probe is not None else 0
    cpu1, wall1 = time.process_time(), time.monotonic()
    n = sum(done)
    counting.clear()
    stop.set()
    for t in pool:
        t.join(timeout=60)
    moved = probe1 - probe0 if probe is not None else None
    return n, errors, cpu1 - cpu0, wall1 - wall0, moved


async def _tasks(
    tasks: int, seconds: float, post: Callable[[], Awaitable[Any]], failure: type[Exception]
) -> tuple[int, list[str], float, float]:
    """``_threads`` for coroutines on this event loop."""
    stop, counting = asyncio.Event(), asyncio.Event()
    done = [0]
    errors: list[str] = []

    async def loop() -> None:
        while not stop.is_set():
            try:
                await post()
                if counting.is_set():
                    done[0] += 1
            except failure as e:
                errors.append(type(e).__name__)

    running = [asyncio.create_task(loop()) for _ in range(tasks)]
    await asyncio.sleep(min(2.0, seconds / 2))
    counting.set()
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, wall1 = time.process_time(), time.monotonic()
    n = done[0]
    stop.set()
    await asyncio.gather(*running)
    return n, errors, cpu1 - cpu0, wall1 - wall0


def _run(
    kind: str,
    threads: int,
    url: str,
    connections: int,
    seconds: float,
    calls: itertools.count[int] | None,
) -> dict[str, Any]:
    client = make_client(kind, connections)

    def post() -> Any:
        r = client.post(url, json=BODY_SENT)
        r.raise_for_status()
        return r.json()

    probe = (lambda: next(calls)) if calls is not None else None
    n, errors, cpu, wall, checks = _threads(threads, seconds, post, httpx.HTTPError, probe)
    opened = open_connections(client)
    client.close()
    return _result(kind, threads, n, errors, cpu, wall, opened, checks)


async def _run_async(tasks: int, url: str, connections: int, seconds: float) -> dict[str, Any]:
    """``tasks`` coroutines posting in a loop through one ``httpx.AsyncClient``."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client:

        async def post() -> Any:
            r = await client.post(url, json=BODY_SENT)
            r.raise_for_status()
            return r.json()

        n, errors, cpu, wall = await _tasks(tasks, seconds, post, httpx.HTTPError)
        opened = open_connections(client)
    return _result("async", tasks, n, errors, cpu, wall, opened, None)


def _aiohttp_session(connections: int) -> aiohttp.ClientSession:
    """Called on the loop that will use it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=30.0),
    )


async def _aiohttp_post(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.post(url, json=BODY_SENT) as r:
        r.raise_for_status()
        return await r.json()


async def _run_aiohttp(tasks: int, url: str, connections: int, seconds: float) -> dict[str, Any]:
    """``tasks`` coroutines posting in a loop through one ``aiohttp.ClientSession``."""
    async with _aiohttp_session(connections) as session:
        post = lambda: _aiohttp_post(session, url)  # noqa: E731
        n, errors, cpu, wall = await _tasks(tasks, seconds, post, aiohttp.ClientError)
    return _result("aiohttp", tasks, n, errors, cpu, wall, -1, None)


def _run_aiohttp_threads(
    threads: int, url: str, connections: int, seconds: float
) -> dict[str, Any]:
    """``threads`` threads posting through one ``aiohttp.ClientSession`` on a loop thread,
    each waiting on its request's future."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    async def open_session() -> aiohttp.ClientSession:
        return _aiohttp_session(connections)

    session = asyncio.run_coroutine_threadsafe(open_session(), loop).result()

    def post() -> Any:
        return asyncio.run_coroutine_threadsafe(_aiohttp_post(session, url), loop).result()

    try:
        n, errors, cpu, wall, _ = _threads(threads, seconds, post, aiohttp.ClientError)
    finally:
        asyncio.run_coroutine_threadsafe(session.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)
        loop.close()
    return _result("aiohttp-threads", threads, n, errors, cpu, wall, -1, None)


def _result(
    kind: str,
    threads: int,
    n: int,
    errors: list[str],
    cpu_s: float,
    wall_s: float,
    opened: int,
    checks: int | None,
) -> dict[str, Any]:
    """One run's figures: ``n`` requests in ``wall_s``, costing ``cpu_s`` of this process."""
    return {
        "client": kind,
        "threads": threads,
        "requests": n,
        "errors": errors,
        "req_per_s": n / wall_s,
        "cpu_ms_per_req": 1000 * cpu_s / max(n, 1),
        "cpu_share": cpu_s / wall_s,
        "connections": opened,
        "checks_per_req": checks / max(n, 1) if checks is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="16,64,192")
    p.add_argument("--clients", default="single,sharded")
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    p.add_argument("--json", action="store_true", help="each configuration's runs as JSON")
    p.add_argument(
        "--count",
        action="store_true",
        help="also count httpcore's connection checks per request (slows the client)",
    )
    a = p.parse_args(argv)
    proc, url = start_server(a.delay_ms)
    try:
        print(
            f"server delay {a.delay_ms} ms, max_connections {a.connections}, "
            f"{a.seconds} s per run, {os.cpu_count()} CPUs"
        )
        print(f"{'client':10} {'threads':>7} {'req/s':>8} {'CPU ms/req':>10} {'CPU%':>5} errors")
        kinds = a.clients.split(",")
        for threads in [int(x) for x in a.threads.split(",")]:
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
            for rep in range(a.repeats):  # the order alternates, so drift hits both kinds
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                    runs[kind].append(
                        run_one(kind, threads, url, a.connections, a.seconds, a.count)
                    )
            for kind in kinds:
                rs = sorted(runs[kind], key=lambda r: r["cpu_ms_per_req"])
                r = rs[len(rs) // 2]  # the median run by CPU per request
                if a.json:
                    print(json.dumps(runs[kind]))
                errs = ",".join(e for x in rs for e in x["errors"])
                each = ", ".join(f"{x['cpu_ms_per_req']:.2f}" for x in runs[kind])
                print(
                    f"{kind:10} {threads:7d} {r['req_per_s']:8.0f} {r['cpu_ms_per_req']:10.3f} "
                    f"{100 * r['cpu_share']:5.0f} {errs or 0}   ({each})"
                    + (
                        f"  checks/req {r['checks_per_req']:.0f}"
                        if a.count and r["checks_per_req"] is not None
                        else ""
                    )
                    + f"  conns {r['connections']}",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
