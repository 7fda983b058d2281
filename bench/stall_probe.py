"""Requests that hang at the proxy (issue 13): drive Serve's HTTP proxy like the worker does.

    python -m bench.stall_probe [--seconds 180] [--threads 192] [--slow 5]
                                [--out bench/results/stall_probe.json]

A local Ray + Serve with one trivial batched deployment (``/stallprobe``: 32 items a
batch, 0.05 s + 2 ms an item, like the simulated accelerator), then ``--threads``
threads calling it back to back through one ``ServeClient`` (the worker's pool and
timeouts). Every request slower than ``--slow`` seconds is logged with its connection:
local port, whether the connection was reused and how long it had been idle, and, while
it hangs, ``ss`` lines of both ends of that connection (queues, timers). The summary:
count, failures by type, requests over 1 s and over ``--slow``, p50, p99, max.
"""

# No ``from __future__ import annotations``: the deployment travels by value and FastAPI
# reads its endpoint's annotations at runtime.
import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpcore._sync.http11 as http11
import ray
from fastapi import FastAPI, Request
from ray import serve

from config import Settings
from local_backend.server import free_port
from serve_runtime.client import ServeClient

ROUTE = "/stallprobe"
app = FastAPI()


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class StallProbe:
    """A stand-in for a batched accelerator: cheap, so the proxy is what is under load."""

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def run(self, items: list[int]) -> list[int]:
        await asyncio.sleep(0.05 + 0.002 * len(items))
        return items

    @app.post("/")
    async def call(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"result": await self.run(int(body.get("x", 0)))}


# -- the client side: which connection each request rode on

_conn = threading.local()
_original_handle = http11.HTTP11Connection.handle_request


def _traced_handle(self: http11.HTTP11Connection, request: Any) -> Any:
    """Record the connection a request rides on (port, reuse, idle) before sending it."""
    sock = self._network_stream.get_extra_info("socket")
    try:
        port = sock.getsockname()[1] if sock is not None else None
    except OSError:  # closed under us: the pool then skips this connection
        port = None
    idle = None
    if self._expire_at is not None and self._keepalive_expiry is not None:
        idle = time.monotonic() - (self._expire_at - self._keepalive_expiry)
    # In place: the watcher holds this dict while the request is in flight.
    _conn.info.update(
        port=port,
        reused=self._request_count > 0,
        uses_before=self._request_count,
        idle_s=None if idle is None else round(idle, 3),
    )
    return _original_handle(self, request)


def ss_lines(port: int, server_port: int) -> list[str]:
    """Both ends of one loopback connection as ``ss`` sees them (queues, timers)."""
    flt = (
        f"( sport = :{port} and dport = :{server_port} ) or "
        f"( sport = :{server_port} and dport = :{port} )"
    )
    try:
        run = subprocess.run(["ss", "-tanoi", flt], capture_output=True, text=True, timeout=5)
        out = run.stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"ss failed: {e}"]
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


class Probe:
    def __init__(self, client: ServeClient, server_port: int, slow_s: float) -> None:
        self.client = client
        self.server_port = server_port
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.slow: list[dict[str, Any]] = []
        # thread id -> (start, connection info, ss lines taken while it hung)
        self.in_flight: dict[int, tuple[float, dict[str, Any], list[str]]] = {}

    def worker(self, stop_at: float, n: int) -> None:
        me = threading.get_ident()
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            _conn.info = {}
            start = time.monotonic()
            with self.lock:
                self.in_flight[me] = (start, _conn.info, [])
            error = None
            try:
                self.client._request("post", ROUTE, {"x": n * 1_000_000 + i}, {})
            except Exception as e:  # counted and logged, the probe goes on
                error = f"{type(e).__name__}: {e}"
            took = time.monotonic() - start
            with self.lock:
                _, _, seen = self.in_flight.pop(me)
                self.latencies.append(took)
                if error:
                    kind = error.split(":")[0] + ":" + error.rsplit("(", 1)[-1].rstrip(")")
                    self.errors[kind] = self.errors.get(kind, 0) + 1
                if took > self.slow_s or error:
                    rec = {"took_s": round(took, 3), "error": error, **_conn.info, "ss": seen}
                    self.slow.append(rec)
                    print(json.dumps(rec), flush=True)

    def watch(self, stop: threading.Event, hung_s: float, most: int) -> None:
        """While a request hangs past ``hung_s``, take ``ss`` of its connection once."""
        taken = 0
        while taken < most and not stop.wait(1.0):
            now = time.monotonic()
            with self.lock:
                hung = [(k, e) for k, e in self.in_flight.items() if now - e[0] > hung_s]
            for thread, entry in hung:
                _, info, seen = entry
                if not seen and info.get("port") and taken < most:
                    lines = ss_lines(info["port"], self.server_port)
                    taken += 1
                    with self.lock:  # kept only if the request still hangs after ss
                        if self.in_flight.get(thread) is entry:
                            seen.extend(lines)

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = len(lat)
        return {
            "requests": n,
            "per_s": round(n / seconds, 1),
            "failed": dict(self.errors),
            "over_1s": sum(1 for x in lat if x > 1.0),
            f"over_{self.slow_s:g}s": sum(1 for x in lat if x > self.slow_s),
            "p50_s": round(lat[n // 2], 3) if n else None,
            "p99_s": round(lat[int(n * 0.99)], 3) if n else None,
            "max_s": round(lat[-1], 3) if n else None,
        }


def receipt_figures(receipts: list[float]) -> dict[str, Any]:
    """How soon the proxy acknowledged (100 Continue or the answer): what bounds it."""
    r = sorted(receipts)
    n = len(r)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "p50_s": round(r[n // 2], 4),
        "p99_s": round(r[int(n * 0.99)], 4),
        "p999_s": round(r[int(n * 0.999)], 4),
        "max_s": round(r[-1], 4),
        "over_0.5s": sum(1 for x in r if x > 0.5),
        "over_1s": sum(1 for x in r if x > 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stall_probe", description=__doc__)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--threads", type=int, default=192)
    ap.add_argument("--slow", type=float, default=5.0)
    ap.add_argument("--hung", type=float, default=15.0, help="ss a connection hung this long")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    port = free_port("127.0.0.1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(StallProbe.bind(), name="stallprobe", route_prefix=ROUTE)
        settings = Settings()
        client = ServeClient(settings, base_url=f"http://127.0.0.1:{port}")
        client._request("post", ROUTE, {"x": 0}, {})
        backend = client.receipt
        receipts: list[float] = []  # seconds from a request to its first byte back
        observe = backend.observe

        def observed(seconds: float) -> None:
            receipts.append(seconds)
            observe(seconds)

        backend.observe = observed  # type: ignore[method-assign]
        http11.HTTP11Connection.handle_request = _traced_handle  # type: ignore[method-assign]
        probe = Probe(client, port, args.slow)
        stop = threading.Event()
        watcher = threading.Thread(target=probe.watch, args=(stop, args.hung, 50), daemon=True)
        watcher.start()
        started = time.monotonic()
        stop_at = started + args.seconds
        threads = [
            threading.Thread(target=probe.worker, args=(stop_at, n), daemon=True)
            for n in range(args.threads)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        elapsed = time.monotonic() - started
        result = {
            "command": "python -m bench.stall_probe " + " ".join(argv or sys.argv[1:]),
            "threads": args.threads,
            "seconds": round(elapsed, 1),
            "client": {
                "read_timeout_s": settings.serve_read_timeout_s,
                "max_connections": settings.serve_max_connections,
                "ack_timeout_s": settings.serve_ack_timeout_s,
                "server_acks": backend.server_acks,
                "sent_again": backend.unacknowledged,
                "final_bound_s": backend.bound(),
            },
            "summary": probe.summary(elapsed),
            "receipts": receipt_figures(receipts),
            "slow": probe.slow,
        }
        print(json.dumps({**result["client"], **result["summary"]}), flush=True)
        print(json.dumps({"receipts": result["receipts"]}), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
