"""The HTTP proxy's memory under distinct multiplexing ids (issue 12, item 9).

    python -m bench.proxy_memory [--requests 50000] [--concurrency 32]
                                 [--routers ray,bounded] [--modes compatible,model_affine]
                                 [--out bench/results/proxy_memory.json] [--workdir D]

Per (router, mode): a fresh stack (local backend, local Ray + Serve), the example
classifier deployed with Ray's default request router (``ray``) or the runtime's
(``bounded``, ``serve_runtime/routing.py``), a warm-up, then ``--requests`` tiny calls
for one model by one user, each with its own JWT (its ``exp`` differs, as with
``SYNAPSE_BRIDGE_TOKEN_TTL`` one second to the next). In compatible mode the JWT is
the multiplexing header; in model-affine mode the header is ``tenant:model`` and the
JWT rides in ``synapse-model-token``. Reported: the proxy's RSS and what its router
holds (``proxy_router_stats``), before, during and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.context import _get_global_client
from ray.serve.deployment import Application

from bench.harness import bench_stack, log, machine_info
from devtools.demo_env import DEMO_USERS, EXAMPLE_PLUGIN
from serve_runtime.deploy import build_application
from serve_runtime.tokens import (
    AFFINE_TOKEN_HEADER,
    MODEL_TOKEN_HEADER,
    ModelKey,
    create_serve_multiplexed_model_id,
)

ROOT = Path(__file__).resolve().parent.parent
BODY = {"inputs": [[5.0, 3.4, 1.5, 0.2]]}
USER, MODEL, TENANT = "alice", 1, "acme"
WARM_UP = 200


def headers_for(n: int, mode: str, backend_url: str, first: int) -> list[dict[str, str]]:
    """``n`` calls' headers, each with a JWT of its own (``exp`` one second apart)."""
    token = DEMO_USERS[USER][0]
    out = []
    for i in range(first, first + n):
        jwt = create_serve_multiplexed_model_id(MODEL, token, backend_url, TENANT, ttl_s=3600 + i)
        if mode == "compatible":
            out.append({MODEL_TOKEN_HEADER: jwt})
        else:
            key = str(ModelKey(tenant=TENANT, model=str(MODEL)))
            out.append({MODEL_TOKEN_HEADER: key, AFFINE_TOKEN_HEADER: jwt})
    return out


async def send(url: str, calls: list[dict[str, str]], concurrency: int) -> dict[str, int]:
    """All calls, ``concurrency`` in flight; counts by status (0: transport error)."""
    statuses: dict[int, int] = {}
    it = iter(calls)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:

        async def lane() -> None:
            for headers in it:
                try:
                    status = (await client.post(url, json=BODY, headers=headers)).status_code
                except httpx.HTTPError:
                    status = 0
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return {str(k): v for k, v in sorted(statuses.items())}


def deploy_example(router: str) -> str:
    """Deploy the example classifier with the chosen router; returns its route prefix."""
    spec = build_application(EXAMPLE_PLUGIN)
    app = spec.application
    if router == "ray":  # what build_application gave before issue 12
        default = RequestRouterConfig()
        app = Application(app._bound_deployment.options(request_router_config=default))
    serve.run(app, name=spec.app_name, route_prefix=spec.route_prefix)
    return spec.route_prefix


def proxy_router_stats(route_prefix: str) -> list[dict[str, Any]]:
    """What each HTTP proxy's router holds for ``route_prefix``, and the proxy's RSS.

    Read inside the proxies with Ray's ``__ray_call__`` (a DeveloperAPI); Serve's
    controller names the proxies. For the bench and the tests: routing stays untouched.
    """

    def read(proxy: Any, route: str) -> dict[str, Any]:  # runs in the proxy: by value
        rss_kb = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
        matched = proxy.http_proxy.proxy_router.match_route(route)
        router = None
        if matched is not None and matched[1]._router is not None:
            router = matched[1]._router._asyncio_router._request_router
        return {
            "pid": os.getpid(),
            "rss_kb": rss_kb,
            "router_class": type(router).__name__ if router is not None else None,
            "fallback_ids": len(router._multiplexed_model_id_fallback_match) if router else 0,
            "pending_model_ids": len(router._pending_requests_by_model_id) if router else 0,
        }

    proxies = ray.get(_get_global_client()._controller.get_proxies.remote())
    return ray.get([p.__ray_call__.remote(read, route_prefix) for p in proxies.values()])


def one_proxy(route_prefix: str) -> dict[str, Any]:
    stats = proxy_router_stats(route_prefix)
    if len(stats) != 1:
        raise RuntimeError(f"expected one HTTP proxy, found {len(stats)}")
    return stats[0]


def run_one(router: str, mode: str, n: int, concurrency: int, workdir: Path) -> dict[str, Any]:
    log(f"{router} router, {mode} mode: starting a stack")
    with bench_stack(f"proxy-{router}-{mode}", workdir, workdir) as ctx:
        route_prefix = deploy_example(router)
        url = f"{ctx.serve_url.rstrip('/')}{route_prefix.rstrip('/')}/"
        warm = asyncio.run(send(url, headers_for(WARM_UP, mode, ctx.backend_url, 0), 8))
        calls = headers_for(n, mode, ctx.backend_url, WARM_UP)
        before = one_proxy(route_prefix)
        log(f"  warm ({warm}); proxy before: {before}")
        samples: list[dict[str, Any]] = []
        done = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not done.wait(10.0):
                samples.append({"t_s": round(time.monotonic() - t0, 1), **one_proxy(route_prefix)})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        statuses = asyncio.run(send(url, calls, concurrency))
        wall = time.monotonic() - t0
        done.set()
        sampler.join()
        after = one_proxy(route_prefix)
        log(f"  {n} calls in {wall:.0f}s ({statuses}); proxy after: {after}")
    return {
        "router": router,
        "mode": mode,
        "requests": n,
        "concurrency": concurrency,
        "statuses": statuses,
        "wall_s": round(wall, 1),
        "requests_per_s": round(n / wall, 1),
        "before": before,
        "after": after,
        "rss_growth_mib": round((after["rss_kb"] - before["rss_kb"]) / 1024, 1),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--routers", default="ray,bounded")
    parser.add_argument("--modes", default="compatible,model_affine")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "proxy-memory.json"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    result: dict[str, Any] = {
        "command": "python -m bench.proxy_memory " + " ".join(shlex.quote(a) for a in argv),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="synapse-bench-proxy-") as tmp:
        base = args.workdir or Path(tmp)
        for router in args.routers.split(","):
            for mode in args.modes.split(","):
                workdir = base / f"{router}-{mode}"
                run = run_one(router, mode, args.requests, args.concurrency, workdir)
                result["runs"].append(run)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["runs"]:
        print(
            f"{r['router']:8} {r['mode']:13} {r['requests']} calls {r['requests_per_s']}/s "
            f"{r['statuses']}: proxy RSS {r['before']['rss_kb'] // 1024} -> "
            f"{r['after']['rss_kb'] // 1024} MiB (+{r['rss_growth_mib']}), fallback ids "
            f"{r['before']['fallback_ids']} -> {r['after']['fallback_ids']}, pending-by-id "
            f"{r['before']['pending_model_ids']} -> {r['after']['pending_model_ids']}",
            flush=True,
        )
    print(f"-> {args.out}", flush=True)


if __name__ == "__main__":
    main()
