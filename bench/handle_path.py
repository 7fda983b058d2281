"""The serve call's transport: Serve's HTTP proxy against a ``DeploymentHandle`` (issue 13).

    .venv/bin/python -m bench.handle_path [--calls 3000] [--threads 16] [--rounds 2]

Issue 13 asks whether a worker inside the Ray cluster should skip the HTTP proxy and
call the deployment through a ``DeploymentHandle``, and to keep that path only if the
numbers say so. This measures the transport alone, before any product code is built
for it: one replica of a small deployment that answers both ways with the same work
(an FastAPI ``POST /`` and a plain method, the classifier's four-feature body in, a
small dict out), called from this process by ``--threads`` threads as the worker's
task threads call Serve:

* **http**: one pooled ``httpx.Client`` (100 connections), ``POST`` to the proxy, as
  ``serve_runtime.client.ServeClient`` does;
* **handle**: ``serve.get_deployment_handle(...).answer.remote(body).result()`` from
  the same threads: this process is a Ray driver, as a worker on a cluster node would be;
* **handle-asgi**: the same handle, but the method runs the HTTP request (headers and
  body bytes) through the replica's own ASGI app in process: the FastAPI app, its
  middleware and endpoint, as the proxy's request would. This is the path a product
  transport could take without changing what a plugin or the runtime's checks see.

Rounds alternate (http, handle, http, ...) so the machine's drift hits both. For each:
calls/s, latency p50/p99, and CPU per call by process: this process (the caller), Serve's
proxy, the replica, and the rest of the machine (Ray's GCS, raylet, controller). Writes
JSON (``--out``) and prints a table. Run it alone: it starts its own local Ray.
"""

# No `from __future__ import annotations`: with it, the ingress endpoint's body
# annotation reaches FastAPI as a string and every POST is refused (422).
import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ray
from fastapi import FastAPI
from ray import serve

from bench.harness import CpuWindow, dist_ms, machine_info, pids_titled
from local_backend.server import free_port
from serve_runtime.asgi_call import Headers, call_asgi

APP = "handle-path"
BODY = {"inputs": [[5.1, 3.5, 1.4, 0.2]], "request_id": "x" * 32}

api = FastAPI()


def answer_for(body: dict[str, Any]) -> dict[str, Any]:
    """The same small work on both paths (the transport is what is measured)."""
    rows = body["inputs"]
    return {"predictions": [max(range(len(r)), key=r.__getitem__) for r in rows], "n": len(rows)}


@serve.deployment(max_ongoing_requests=200, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Transport:
    @api.post("/")
    async def post(self, body: dict[str, Any]) -> dict[str, Any]:
        return answer_for(body)

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        return answer_for(body)

    async def asgi(self, headers: Headers, body: bytes) -> tuple[int, Headers, bytes]:
        """The HTTP request run through this replica's own ASGI app (FastAPI, its
        middleware and endpoint), in process, as the product's handle transport does."""
        app = self._asgi_app  # type: ignore[attr-defined]
        return await call_asgi(app, "POST", "/", "", headers, body)


def measure(call: Any, calls: int, threads: int) -> dict[str, Any]:
    """``calls`` calls over ``threads`` threads; latency, rate and CPU by process."""
    latencies: list[float] = []
    lock = threading.Lock()
    failures: list[str] = []

    def one(_: int) -> None:
        t0 = time.perf_counter()
        try:
            answer = call()
            if answer["n"] != 1:
                raise ValueError(f"wrong answer: {answer}")
        except Exception as e:
            with lock:
                failures.append(f"{type(e).__name__}: {str(e)[-1500:]}")
            return
        with lock:
            latencies.append(time.perf_counter() - t0)

    me = os.getpid()
    window = CpuWindow(
        {
            "caller": lambda: [me],
            "proxy": lambda: pids_titled("ray::ProxyActor"),
            "replica": lambda: pids_titled(f"ray::ServeReplica:{APP}"),
        }
    ).start()
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(calls)))
    wall = time.perf_counter() - started
    cpu = window.stop(calls)
    return {
        "calls": calls,
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "calls_per_s": round(len(latencies) / wall, 1),
        "latency_ms": dist_ms(latencies),
        "cpu_ms_per_call": cpu["cpu_ms_per_job"],
        "rest_ms_per_call": cpu["rest_ms_per_job"],
        "machine_busy": cpu["machine_busy"],
    }


def run(calls: int, threads: int, rounds: int) -> dict[str, Any]:
    port = free_port("127.0.0.1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Transport.bind(), name=APP, route_prefix=f"/{APP}")
        handle = serve.get_deployment_handle("Transport", app_name=APP)
        url = f"http://127.0.0.1:{port}/{APP}/"
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        with httpx.Client(limits=limits, timeout=30) as http:

            def by_http() -> dict[str, Any]:
                r = http.post(url, json=BODY)
                r.raise_for_status()
                return r.json()

            def by_handle() -> dict[str, Any]:
                return handle.answer.remote(BODY).result(timeout_s=30)

            raw = json.dumps(BODY).encode()
            headers = [(b"content-type", b"application/json")]

            def by_handle_asgi() -> dict[str, Any]:
                status, _, body = handle.asgi.remote(headers, raw).result(timeout_s=30)
                if status != 200:
                    raise RuntimeError(f"status {status}: {body[:200]!r}")
                return json.loads(body)

            paths = {"http": by_http, "handle": by_handle, "handle-asgi": by_handle_asgi}
            for call in paths.values():  # warm: connections, the handle's router
                measure(call, 200, threads)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
            for i in range(rounds):
                for name, call in paths.items():
                    r = measure(call, calls, threads)
                    results[name].append(r)
                    print(f"round {i + 1} {name}: {summary_line(r)}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "machine": machine_info(),
        "ray": ray.__version__,
        "calls": calls,
        "threads": threads,
        "rounds": results,
    }


def summary_line(r: dict[str, Any]) -> str:
    if r["failures"] == r["calls"]:
        return f"every call failed: {r['first_failure']}"
    cpu = r["cpu_ms_per_call"]
    stack = sum(cpu.values())
    return (
        f"{r['calls_per_s']} calls/s, p50 {r['latency_ms']['p50']} ms, p99 "
        f"{r['latency_ms']['p99']} ms, CPU ms/call: caller {cpu['caller']}, proxy "
        f"{cpu['proxy']}, replica {cpu['replica']}, rest {cpu['rest']} (all {stack:.2f}); "
        f"{r['failures']} failed {r['first_failure'] or ''}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run(args.calls, args.threads, args.rounds)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
