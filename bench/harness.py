"""The benchmark's shared parts: the stack, the seeded population, the three systems.

- ``bench_stack``: the demo's stack (``devtools.demo_env.demo_stack``: a seeded local
  backend, a local Ray with Serve on a free port) plus the bench's own population.
- ``run_direct``: async HTTP straight to the Serve endpoint, N in flight.
- ``run_queued(..., BridgeSystem | PeerSystem)``: a fresh Redis, the system started on
  it, jobs created on the backend, a warm-up, then the measured jobs sent by a producer
  subprocess and followed on the backend until final; figures from each job's
  ``metrics_record`` (written by the system itself: submit -> final write).

Everything started here is stopped here; nothing is assumed to be running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray
import redis
from ray import serve

from bench import peer
from bench.pool import cpu_ticks, machine_ticks, mem_total_kb, process_tree, rss_kb, versions
from config import load_plugin_config, load_settings
from config.plugin import ServeOptions
from devtools.demo import start_worker
from devtools.demo_env import SERVICE_TOKEN, demo_stack
from devtools.redis_server import RedisServer
from examples.classifier.model import write_model_archive as classifier_archive
from local_backend.client import AdminClient
from local_backend.server import free_port
from serve_runtime.client import ServeClient
from serve_runtime.deploy import deploy

ROOT = Path(__file__).resolve().parent.parent
SIMACCEL = ROOT / "bench" / "plugins" / "simaccel"
DIGITS_PLUGIN = ROOT / "examples" / "digits"
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER_QUEUE = "synapse_peer"

Log = Callable[[str], None]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def dist_ms(values_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max in milliseconds of a list of seconds."""
    if not values_s:
        return {}
    return {
        "p50": round(percentile(values_s, 50) * 1000, 2),
        "p90": round(percentile(values_s, 90) * 1000, 2),
        "p99": round(percentile(values_s, 99) * 1000, 2),
        "mean": round(sum(values_s) / len(values_s) * 1000, 2),
        "max": round(max(values_s) * 1000, 2),
        "n": len(values_s),
    }


def timeline(times: list[float], start: float, bin_s: float | None = None) -> dict[str, Any]:
    """Completions per bin since ``start`` (for the throughput-over-time plots)."""
    if not times:
        return {"bin_s": bin_s or 0.5, "counts": []}
    if bin_s is None:  # about 60 bins, at least 0.1 s each
        bin_s = max(0.1, round((max(times) - start) / 60, 1))
    n = int((max(times) - start) / bin_s) + 1
    counts = [0] * max(1, n)
    for t in times:
        counts[max(0, min(n - 1, int((t - start) / bin_s)))] += 1
    return {"bin_s": bin_s, "counts": counts}


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_gib": round(mem_total_kb() / 1024 / 1024, 1),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def all_versions() -> dict[str, str]:
    out = versions()
    out["httpx"] = httpx.__version__
    return out


# --- the population -------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    id: int
    tenant: str


@dataclass(frozen=True)
class User:
    name: str
    token: str
    tenants: tuple[str, ...]


@dataclass
class Population:
    """N tenant users (one token each), M models owned by the first M tenants.

    Every user is a member of their own tenant and of every tenant owning a model, so
    every (user, model) pair is allowed; a job's tenant is its model's tenant (the
    backend answers 403 otherwise). Jobs rotate over the N x M (user, model) pairs:
    N x M distinct multiplexing tokens in the compatible routing mode.
    """

    prefix: str
    tenants: list[str]
    users: list[User]
    models: list[Model]

    def pairs(self) -> list[tuple[User, Model]]:
        return [(u, m) for u in self.users for m in self.models]

    def describe(self) -> dict[str, Any]:
        return {
            "tenants": len(self.tenants),
            "users": len(self.users),
            "models": [m.id for m in self.models],
            "pairs": len(self.pairs()),
            "interpretation": (
                f"{len(self.users)} tenant users (one token per tenant, each also a member "
                f"of the {len(self.models)} tenants owning the models), {len(self.models)} "
                f"models owned by {len(self.models)} of the tenants; jobs rotate over "
                f"the {len(self.pairs())} (user, model) pairs, a job's tenant being its "
                "model's tenant"
            ),
        }


def make_population(prefix: str, n_tenants: int, n_models: int, first_model_id: int) -> Population:
    tenants = [f"{prefix}t{i:02d}" for i in range(1, n_tenants + 1)]
    models = [Model(first_model_id + k, tenants[k]) for k in range(n_models)]
    owners = [m.tenant for m in models]
    users = [
        User(
            name=f"{prefix}u{i:02d}",
            token=f"bench-{prefix}-user-{i:02d}-token",
            tenants=tuple(dict.fromkeys([t, *owners])),
        )
        for i, t in enumerate(tenants, 1)
    ]
    return Population(prefix, tenants, users, models)


def seed_population(
    admin: Any,
    workdir: Path,
    pop: Population,
    write_archive: Callable[..., Any] | None = None,
) -> None:
    """Tenants, users and models on the backend; the models' archives are the example
    classifier's unless ``write_archive(out, seed=, version=)`` makes others."""
    write = write_archive or classifier_archive
    models = []
    for m in pop.models:
        archive = workdir / "archives" / f"bench-model-{m.id}.tar.gz"
        if not archive.exists():
            write(archive, seed=m.id, version=1)
        models.append(
            {
                "id": m.id,
                "name": f"bench-{m.id}",
                "tenant": m.tenant,
                "version": 1,
                "archive": str(archive),
            }
        )
    admin.seed(
        {
            "tenants": pop.tenants,
            "users": [
                {"name": u.name, "token": u.token, "tenants": list(u.tenants)} for u in pop.users
            ],
            "models": models,
        }
    )


def job_specs(
    prefix: str,
    n: int,
    pop: Population,
    body: Callable[[int], dict[str, Any]],
    *,
    shuffle_seed: int | None = None,
) -> list[dict[str, Any]]:
    pairs = pop.pairs()
    order = [pairs[i % len(pairs)] for i in range(n)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [
        {
            "id": f"{prefix}-{i:06d}",
            "tenant": m.tenant,
            "model": m.id,
            "token": u.token,
            "json": body(i),
        }
        for i, (u, m) in enumerate(order)
    ]


# --- the stack --------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a workload run needs; one per workload (one Ray/backend stack)."""

    workload: str
    workdir: Path
    results_dir: Path
    admin: Any
    backend_url: str
    backend_pid: int
    serve_url: str
    service_token: str
    profile: bool = False
    worker_processes: int = 1  # the bridge's, sharing its in-flight jobs
    serve_transport: str = "http"  # the bridge worker's: Serve's proxy, or "handle"
    timings: dict[str, float] = field(default_factory=dict)

    def final_count(self) -> int:
        jobs = self.admin.stats()["jobs"]
        return sum(jobs.get(s, 0) for s in FINAL)


@contextlib.contextmanager
def bench_stack(
    workload: str,
    workdir: Path,
    results_dir: Path,
    *,
    profile: bool = False,
    worker_processes: int = 1,
    serve_transport: str = "http",
) -> Iterator[Ctx]:
    """The demo's stack (backend + Ray Serve on a free port), fresh for this workload."""
    # A fresh local Ray, never one named by the environment (a test session's, say).
    for var in (
        "RAY_ADDRESS",
        "SYNAPSE_PLUGIN_RELEASE_CHECKSUM",
        "SYNAPSE_PLUGIN_RELEASE_CODE",
        "SYNAPSE_PLUGIN_RUN_HOST",
        "SYNAPSE_BRIDGE_ROUTING_MODE",
        "BROKER_URL",
    ):
        os.environ.pop(var, None)
    t0 = time.perf_counter()
    with demo_stack(workdir, serve_port=free_port("127.0.0.1")) as stack:
        assert stack.backend is not None and stack.backend.proc is not None
        with AdminClient(stack.backend.url, timeout=120) as admin:
            ctx = Ctx(
                workload=workload,
                workdir=workdir,
                results_dir=results_dir,
                admin=admin,
                backend_url=stack.backend.url,
                backend_pid=stack.backend.proc.pid,
                serve_url=os.environ["SYNAPSE_SERVE_URL"],
                service_token=SERVICE_TOKEN,
                profile=profile,
                worker_processes=worker_processes,
                serve_transport=serve_transport,
            )
            ctx.timings["stack_start_s"] = round(time.perf_counter() - t0, 2)
            yield ctx


def serve_options(plugin_dir: Path, action: str, **raw: Any) -> dict[str, Any]:
    """``deploy()`` overrides, validated against the plugin's serve options model."""
    base = load_plugin_config(plugin_dir).action(action).serve
    merged = ServeOptions.model_validate({**base.model_dump(exclude_none=True), **raw})
    return {k: getattr(merged, k) for k in raw}


def deploy_plugin(
    plugin_dir: Path,
    *,
    action: str = "inference",
    env: dict[str, str] | None = None,
    **raw_overrides: Any,
) -> Any:
    """Deploy with ``serve_runtime.deploy.deploy``; ``env`` reaches the replicas."""
    # serve.ingress rewrites the FastAPI app's routes in place: give each deploy of a
    # plugin that is not an installed package a fresh import (and so a fresh app).
    root = str(Path(plugin_dir).resolve())
    for name, mod in list(sys.modules.items()):
        if (getattr(mod, "__file__", None) or "").startswith(root + os.sep):
            del sys.modules[name]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        overrides = serve_options(plugin_dir, action, **raw_overrides) if raw_overrides else None
        return deploy(plugin_dir, action=action, overrides=overrides)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def release_of(plugin_dir: Path) -> dict[str, str]:
    cfg = load_plugin_config(plugin_dir)
    return {"code": cfg.code, "version": cfg.version}


def create_jobs(ctx: Ctx, specs: list[dict[str, Any]], release: dict[str, Any]) -> None:
    for i in range(0, len(specs), 1000):
        ctx.admin.create_jobs(
            [
                {
                    "id": s["id"],
                    "tenant": s["tenant"],
                    "plugin_release": release,
                    "params": {"model": s["model"], "json": s["json"]},
                }
                for s in specs[i : i + 1000]
            ]
        )


def job_records(ctx: Ctx, prefix: str) -> list[dict[str, Any]]:
    return [j for j in ctx.admin.jobs() if j["id"].startswith(prefix + "-")]


# --- CPU accounting --------------------------------------------------------------------


def all_process_ticks() -> dict[int, tuple[str, int]]:
    """Every process now: pid -> (a short name, utime + stime)."""
    out: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            name = argv[0].decode(errors="replace")
            if name.startswith("ray::"):  # an actor's title: ray::ServeReplica:app:Name
                name = name.split(" ")[0]
            elif len(argv) > 2 and argv[1] == b"-m":  # python -m module
                name = f"python -m {argv[2].decode(errors='replace')}"
            else:
                name = os.path.basename(name) or "?"
            out[pid] = (name[:60], cpu_ticks(pid))
    return out


def pids_titled(prefix: str) -> list[int]:
    """The processes whose short name (a Ray actor's title) starts with ``prefix``."""
    return [pid for pid, (name, _) in all_process_ticks().items() if name.startswith(prefix)]


class CpuWindow:
    """CPU seconds per group of processes, and the machine's busy share, over a window."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, int]] = {}
        self._last: dict[str, dict[int, int]] = {}
        self._m0 = machine_ticks()

    def _read(self) -> dict[str, dict[int, int]]:
        return {g: {p: cpu_ticks(p) for p in fn()} for g, fn in self.groups.items()}

    def start(self) -> CpuWindow:
        self._start = self._read()
        self._all0 = all_process_ticks()
        self._m0 = machine_ticks()
        return self

    def _rest_by_process(self, end: dict[str, dict[int, int]], jobs: int) -> dict[str, float]:
        """The "rest" by process name (Ray's actors by their title), ms per job, top 8."""
        grouped = {p for ticks in end.values() for p in ticks}
        by_name: dict[str, float] = {}
        for pid, (name, ticks) in all_process_ticks().items():
            if pid in grouped:
                continue
            before = self._all0.get(pid, (name, 0))[1]
            by_name[name] = by_name.get(name, 0.0) + (ticks - before) / CLK_TCK
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
        return {k: round(v / max(1, jobs) * 1000, 2) for k, v in top if v > 0}

    def stop(self, jobs: int) -> dict[str, Any]:
        end = self._read()
        busy1, total1 = machine_ticks()
        busy0, total0 = self._m0
        out: dict[str, Any] = {}
        accounted = 0.0
        for g, ticks in end.items():
            s = sum(t - self._start.get(g, {}).get(p, 0) for p, t in ticks.items()) / CLK_TCK
            out[g] = s
            accounted += s
        machine_s = (busy1 - busy0) / CLK_TCK
        out["rest"] = max(0.0, machine_s - accounted)
        per_job = {k: round(v / max(1, jobs) * 1000, 2) for k, v in out.items()}
        return {
            "cpu_s": {k: round(v, 2) for k, v in out.items()},
            "cpu_ms_per_job": per_job,
            "rest_ms_per_job": self._rest_by_process(end, jobs),
            "machine_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
        }


class Sampler(threading.Thread):
    """Calls ``fn`` every ``every_s`` seconds; keeps ``(t, value)``; errors are skipped."""

    def __init__(self, fn: Callable[[], Any], every_s: float) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.every_s = every_s
        self.samples: list[tuple[float, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.time(), self.fn()))
            self._halt.wait(self.every_s)

    def stop(self) -> list[tuple[float, Any]]:
        self._halt.set()
        self.join(30)
        return self.samples


# --- direct -----------------------------------------------------------------------------


def direct_calls(
    ctx: Ctx, specs: list[dict[str, Any]], route_prefix: str, routing_mode: str
) -> tuple[str, list[tuple[dict[str, str], Any]]]:
    """The URL and, per job, the headers the bridge would send (precomputed, untimed)."""
    client = ServeClient(load_settings(routing_mode=routing_mode))
    try:
        calls = [
            (
                client.model_headers(model=s["model"], token=s["token"], tenant=s["tenant"]),
                s["json"],
            )
            for s in specs
        ]
    finally:
        client.close()
    return f"{ctx.serve_url.rstrip('/')}{route_prefix.rstrip('/')}/", calls


async def _direct(
    url: str, calls: list[tuple[dict[str, str], Any]], concurrency: int
) -> list[tuple[float, float, int, str]]:
    out: list[tuple[float, float, int, str]] = [(0.0, 0.0, 0, "")] * len(calls)
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:

        async def lane() -> None:
            nonlocal next_i
            while next_i < len(calls):
                i = next_i
                next_i += 1
                headers, body = calls[i]
                t0 = time.time()
                try:
                    r = await client.post(url, json=body, headers=headers)
                    status, err = r.status_code, "" if r.status_code < 400 else r.text[:300]
                except httpx.HTTPError as e:
                    status, err = 0, type(e).__name__
                out[i] = (t0, time.time(), status, err)

        await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(calls))))))
    return out


def run_direct(
    ctx: Ctx,
    specs: list[dict[str, Any]],
    warm: list[dict[str, Any]],
    *,
    route_prefix: str,
    routing_mode: str,
    concurrency: int,
    label: str = "direct",
    cpu_groups: dict[str, Callable[[], list[int]]] | None = None,
) -> dict[str, Any]:
    """HTTP straight to the Serve endpoint, ``concurrency`` in flight, no queue, no write."""
    url, calls = direct_calls(ctx, specs, route_prefix, routing_mode)
    if warm:
        _, warm_calls = direct_calls(ctx, warm, route_prefix, routing_mode)
        asyncio.run(_direct(url, warm_calls, concurrency))
    groups = {"backend": lambda: process_tree(ctx.backend_pid), **(cpu_groups or {})}
    cpu = CpuWindow(groups).start()
    res = asyncio.run(_direct(url, calls, concurrency))
    cpu_out = cpu.stop(len(specs))
    ok = [(a, b) for a, b, st, _ in res if 200 <= st < 300]
    errors = [e or str(st) for _, _, st, e in res if not 200 <= st < 300]
    start, end = min(a for a, _, _, _ in res), max(b for _, b, _, _ in res)
    lat = [b - a for a, b in ok]
    return {
        "system": "direct",
        "label": label,
        "routing_mode": routing_mode,
        "concurrency": concurrency,
        "jobs": len(specs),
        "succeeded": len(ok),
        "failed": len(errors),
        "error_sample": errors[:3],
        "span_s": round(end - start, 3),
        "throughput": round(len(ok) / max(1e-9, end - start), 2),
        "latency_ms": dist_ms(lat),
        "latency_definition": "one HTTP request, sent to answered",
        "timeline": timeline([b for _, b in ok], start),
        **cpu_out,
    }


# --- queued systems: the bridge and the peer ---------------------------------------------


def redis_memory(url: str) -> dict[str, int]:
    r = redis.Redis.from_url(url)
    try:
        info = r.info("memory")
        return {"used_memory": int(info["used_memory"]), "keys": int(r.dbsize())}
    finally:
        r.close()


def redis_census(url: str) -> dict[str, Any]:
    """Keys by kind after a run: count, bytes (MEMORY USAGE), how many have no TTL."""
    r = redis.Redis.from_url(url)
    kinds = {
        "celery_results": lambda k: k.startswith(b"celery-task-meta-"),
        "bridge_final_markers": lambda k: k.startswith(b"synapse:final:"),
    }
    out: dict[str, dict[str, int]] = {
        k: {"keys": 0, "bytes": 0, "no_ttl": 0} for k in [*kinds, "other"]
    }
    others: list[bytes] = []
    try:
        batch: list[bytes] = []

        def flush() -> None:
            pipe = r.pipeline(transaction=False)
            for k in batch:
                pipe.memory_usage(k)
                pipe.ttl(k)
            res = pipe.execute()
            for i, k in enumerate(batch):
                kind = next((n for n, f in kinds.items() if f(k)), "other")
                out[kind]["keys"] += 1
                out[kind]["bytes"] += int(res[2 * i] or 0)
                if res[2 * i + 1] == -1:
                    out[kind]["no_ttl"] += 1
                if kind == "other" and len(others) < 50:
                    others.append(k)
            batch.clear()

        for key in r.scan_iter(count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                flush()
        if batch:
            flush()
        detail = []
        for k in sorted(others):
            kind = r.type(k).decode()
            size = {"list": r.llen, "hash": r.hlen, "set": r.scard, "zset": r.zcard}.get(kind)
            detail.append(
                {"key": k.decode(errors="replace"), "type": kind, "len": size(k) if size else None}
            )
        return {"by_kind": out, "other_keys": detail}
    finally:
        r.close()


def settled_redis_memory(url: str, timeout_s: float = 15.0) -> dict[str, int]:
    """``redis_memory`` once it stops moving: after a mass delete Redis shrinks its key
    tables in its cron (within about 0.5 s here; 50,000 keys leave ~1.1 MB of table
    until then), which is not memory the keys kept."""
    deadline = time.monotonic() + timeout_s
    last = redis_memory(url)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = redis_memory(url)
        if abs(now["used_memory"] - last["used_memory"]) <= 0.01 * last["used_memory"]:
            return now
        last = now
    return last


def purge_ttl_keys(url: str) -> int:
    """Delete the keys that expire by design (Celery results, bridge done markers)."""
    r = redis.Redis.from_url(url)
    n = 0
    try:
        for pattern in ("celery-task-meta-*", "synapse:final:*"):
            batch = []
            for key in r.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    n += r.delete(*batch)
                    batch = []
            if batch:
                n += r.delete(*batch)
        return n
    finally:
        r.close()


def profiler_command(out: Path) -> tuple[list[str], str]:
    """py-spy (SVG flame graph, all subprocesses) or, failing that, pyinstrument."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if Path(spy).exists():
        return [spy, "record", "-o", str(out), "--subprocesses", "--"], "py-spy"
    with contextlib.suppress(ImportError):
        import pyinstrument  # type: ignore[import-not-found]  # noqa: F401

        html = out.with_suffix(".html")
        return [
            sys.executable,
            "-m",
            "pyinstrument",
            "-r",
            "html",
            "-o",
            str(html),
        ], "pyinstrument"
    raise RuntimeError("--profile needs py-spy (pip install py-spy) or pyinstrument")


class BridgeSystem:
    """This project's worker (``python -m worker.cli worker -c N``) as a subprocess, or
    ``ctx.worker_processes`` of them sharing the N in-flight jobs (N / P threads each)."""

    name = "bridge"

    def __init__(
        self,
        ctx: Ctx,
        tag: str,
        *,
        concurrency: int,
        routing_mode: str,
        profile_out: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.tag = tag
        self.concurrency = concurrency
        self.routing_mode = routing_mode
        self.profile_out = profile_out
        self.profiler: str | None = None
        self.extra_env = extra_env or {}
        self.workdir = ctx.workdir / f"bridge-{tag}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pid: int | None = None
        self.more: list[subprocess.Popen[bytes]] = []  # processes 2..P
        self.metrics_ports: list[int] = []  # each worker process's Prometheus port

    def env(self, redis_url: str) -> dict[str, str]:
        return {
            "REDIS_URL": redis_url,
            "SYNAPSE_BRIDGE_ROUTING_MODE": self.routing_mode,
            "SYNAPSE_BRIDGE_LOG_FORMAT": "json",
            "SYNAPSE_BRIDGE_METRICS_PORT": "0",
            "SYNAPSE_BRIDGE_WORKER_CONCURRENCY": str(self.concurrency),
            "SYNAPSE_BRIDGE_SERVE_MAX_CONNECTIONS": str(max(100, self.concurrency)),
            **self.transport_env(),
            **self.extra_env,
        }

    def transport_env(self) -> dict[str, str]:
        """With the handle transport, the worker joins this process's Ray cluster."""
        if self.ctx.serve_transport == "http":
            return {}
        return {
            "SYNAPSE_BRIDGE_SERVE_TRANSPORT": self.ctx.serve_transport,
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        }

    def start(self, redis_url: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = self.env(redis_url)
        self.metrics_ports = [free_port() for _ in range(self.ctx.worker_processes)]
        env["SYNAPSE_BRIDGE_METRICS_PORT"] = str(self.metrics_ports[0])
        if self.profile_out is None:
            self.proc = start_worker(self.workdir, env, self.threads_each)
            self.worker_pid = self.proc.pid
            for i in range(1, self.ctx.worker_processes):
                (self.workdir / f"w{i}").mkdir(exist_ok=True)
                env_i = {**env, "SYNAPSE_BRIDGE_METRICS_PORT": str(self.metrics_ports[i])}
                self.more.append(start_worker(self.workdir / f"w{i}", env_i, self.threads_each))
            return
        self.metrics_ports = self.metrics_ports[:1]
        prefix, self.profiler = profiler_command(self.profile_out)
        logf = (self.workdir / "worker.log").open("ab")
        cmd = [*prefix, sys.executable, "-m", "worker.cli", "worker", "-c", str(self.concurrency)]
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            cwd=str(ROOT),
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while "worker ready" not in (self.workdir / "worker.log").read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {self.workdir / 'worker.log'}")
            time.sleep(0.1)
        if self.profiler == "py-spy":
            kids = [p for p in process_tree(self.proc.pid) if p != self.proc.pid]
            self.worker_pid = kids[0] if kids else self.proc.pid
        else:
            self.worker_pid = self.proc.pid

    @property
    def threads_each(self) -> int:
        """Each worker process's share of the in-flight jobs (rounded up)."""
        return -(-self.concurrency // self.ctx.worker_processes)

    def _roots(self) -> list[int]:
        """The worker processes (under a profiler: the worker, not the profiler)."""
        return ([self.worker_pid] if self.worker_pid else []) + [p.pid for p in self.more]

    def serve_calls(self) -> tuple[float, float]:
        """(serve calls, jobs they carried) through the coalescer so far, over the
        worker processes, from their Prometheus metrics: the mean group size."""
        calls = items = 0.0
        for port in self.metrics_ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for line in text.splitlines():
                if line.startswith("synapse_coalesced_call_items_count"):
                    calls += float(line.split()[-1])
                elif line.startswith("synapse_coalesced_call_items_sum"):
                    items += float(line.split()[-1])
        return calls, items

    def alive(self) -> bool:
        return self.proc is not None and all(p.poll() is None for p in (self.proc, *self.more))

    def pids(self) -> list[int]:
        return [pid for root in self._roots() for pid in process_tree(root)]

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self._roots())

    def log_path(self) -> Path:
        return self.workdir / "worker.log"

    def stop(self) -> None:
        for proc in self.more:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.more:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.proc is None:
            return
        target = self.worker_pid or self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)

    def describe(self) -> dict[str, Any]:
        return {
            "command": f"python -m worker.cli worker -c {self.concurrency}"
            if self.ctx.worker_processes == 1
            else f"{self.ctx.worker_processes} x python -m worker.cli worker "
            f"-c {self.threads_each}",
            "routing_mode": self.routing_mode,
            "env": {k: v for k, v in self.env("redis://...").items() if k != "REDIS_URL"},
            "profiler": self.profiler,
        }


class PeerSystem:
    """Ray Serve's ``task_consumer`` (``bench/peer.py``) as its own Serve application."""

    name = "peer"

    def __init__(self, ctx: Ctx, tag: str, *, concurrency: int, routing_mode: str) -> None:
        self.ctx = ctx
        self.tag = tag
        self.concurrency = concurrency
        self.routing_mode = routing_mode

    def start(self, redis_url: str) -> None:
        app = peer.build_app(
            redis_url=redis_url,
            queue=PEER_QUEUE,
            concurrency=self.concurrency,
            backend_url=self.ctx.backend_url,
            service_token=self.ctx.service_token,
            serve_url=self.ctx.serve_url,
            routing_mode=self.routing_mode,
        )
        serve.run(app, name=peer.APP_NAME, route_prefix=None)

    def alive(self) -> bool:
        return True

    def pids(self) -> list[int]:
        return []

    def log_path(self) -> Path:
        return Path("(Ray's replica logs under /tmp/ray/session_latest/logs/serve)")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            serve.delete(peer.APP_NAME)

    def describe(self) -> dict[str, Any]:
        return {
            "command": "serve.run(@task_consumer deployment, bench/peer.py)",
            "routing_mode": self.routing_mode,
            "consumer_concurrency": self.concurrency,
        }


def produce(
    ctx: Ctx,
    system: str,
    redis_url: str,
    specs: list[dict[str, Any]],
    release: dict[str, Any],
    tag: str,
    *,
    sequential: bool = False,
    rate: float | None = None,
) -> dict[str, Any]:
    """``rate``: open loop at that many jobs/s (``bench/producer.py --rate``)."""
    spec_path = ctx.workdir / f"{tag}.jobs.json"
    spec_path.write_text(json.dumps({"release": release, "jobs": specs}))
    cmd = [sys.executable, "-m", "bench.producer", system, str(spec_path), "--queue", PEER_QUEUE]
    if sequential:
        cmd += ["--sequential", ctx.backend_url]
    if rate is not None:
        cmd += ["--rate", str(rate)]
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("BROKER_URL", None)
    out = subprocess.run(
        cmd,
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=max(300, len(specs) * (2.0 if sequential else 0.05) + len(specs) / (rate or 1e9)),
    )
    spec_path.unlink(missing_ok=True)
    if out.returncode != 0:
        raise RuntimeError(f"producer failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_final(
    ctx: Ctx,
    target: int,
    *,
    system: Any,
    stall_s: float = 120.0,
    progress: Callable[[int], None] | None = None,
    every_s: float = 0.25,
) -> int:
    """Until the backend counts ``target`` final jobs; fail on a dead worker or a stall."""
    last, last_change = -1, time.monotonic()
    while True:
        n = ctx.final_count()
        if progress is not None:
            progress(n)
        if n >= target:
            return n
        if n != last:
            last, last_change = n, time.monotonic()
        if not system.alive():
            raise RuntimeError(f"{system.name} exited; see {system.log_path()}")
        if time.monotonic() - last_change > stall_s:
            raise TimeoutError(
                f"{system.name}: no job finished for {stall_s:.0f}s "
                f"({n} of {target} final); see {system.log_path()}"
            )
        time.sleep(every_s)


def summarize_records(records: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    """Throughput and latencies from the jobs' ``metrics_record`` (one clock)."""
    by_status: dict[str, int] = {}
    for j in records:
        by_status[j["status"]] = by_status.get(j["status"], 0) + 1
    ms = [
        j["metrics_record"]
        for j in records
        if j["status"] == "SUCCEEDED" and (j.get("metrics_record") or {}).get("total_s") is not None
    ]
    out: dict[str, Any] = {
        "jobs": expected,
        "by_status": by_status,
        "succeeded": by_status.get("SUCCEEDED", 0),
        "failed": by_status.get("FAILED", 0),
        "lost": expected - sum(by_status.get(s, 0) for s in FINAL),
    }
    if not ms:
        return out
    first = min(m["submitted_at"] for m in ms)
    last = max(m["finished_at"] for m in ms)
    out.update(
        {
            "span_s": round(last - first, 3),
            "throughput": round(len(ms) / max(1e-9, last - first), 2),
            "latency_ms": dist_ms([m["total_s"] for m in ms]),
            "latency_definition": "submit to final write (metrics_record.total_s)",
            "queue_wait_ms": dist_ms([m.get("queue_wait_s", 0.0) for m in ms]),
            "service_ms": dist_ms([m["finished_at"] - m["started_at"] for m in ms]),
            "inference_ms": dist_ms([m.get("inference_s", 0.0) for m in ms]),
            "attempts_max": max(int(m.get("attempts", 1)) for m in ms),
            "timeline": timeline([m["finished_at"] for m in ms], first),
        }
    )
    return out


@contextlib.contextmanager
def queued_system(
    ctx: Ctx,
    system: BridgeSystem | PeerSystem,
    warm: list[dict[str, Any]],
    release: dict[str, Any],
    *,
    tag: str,
) -> Iterator[str]:
    """A system started on a fresh Redis and warmed up, for several measured phases on
    the one system (W6's rates); yields the Redis URL, stops both on the way out."""
    create_jobs(ctx, warm, release)
    broker = RedisServer().start()
    try:
        system.start(broker.url)
        if warm:
            base = ctx.final_count()
            produce(ctx, system.name, broker.url, warm, release, f"{tag}-warm")
            wait_final(ctx, base + len(warm), system=system)
            time.sleep(0.5)
        yield broker.url
    finally:
        system.stop()
        broker.close()


def _mean_group(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """Jobs per serve call between two ``BridgeSystem.serve_calls`` readings (None when
    the coalescer sent nothing: coalescing off)."""
    calls, items = after[0] - before[0], after[1] - before[1]
    return round(items / calls, 2) if calls else None


def run_queued(
    ctx: Ctx,
    system: BridgeSystem | PeerSystem,
    specs: list[dict[str, Any]],
    warm: list[dict[str, Any]],
    release: dict[str, Any],
    *,
    prefix: str,
    label: str,
    sequential: bool = False,
    soak: bool = False,
    during: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """One system on a fresh Redis: warm up, then the measured jobs, followed to the end.

    ``prefix``: the measured jobs' id prefix (``<prefix>-NNNNNN``). ``during``: called
    before the measured jobs are sent; returns a ``stop()`` whose result goes into the
    figures as ``during``.
    """
    tag = prefix
    create_jobs(ctx, warm + specs, release)
    broker = RedisServer().start()
    figures: dict[str, Any] = {"system": system.name, "label": label, **system.describe()}
    stop_during: Callable[[], Any] | None = None
    samplers: dict[str, Sampler] = {}
    try:
        t0 = time.perf_counter()
        system.start(broker.url)
        figures["start_s"] = round(time.perf_counter() - t0, 2)
        base = ctx.final_count()
        if warm:
            produce(ctx, system.name, broker.url, warm, release, f"{tag}-warm")
            wait_final(ctx, base + len(warm), system=system)
            time.sleep(0.5)
        base = ctx.final_count()
        if soak:
            # The baseline holds no key that expires by design (the warm-up's results and
            # done markers are deleted first), so it compares with the purged end state.
            figures["redis_warmup_purged_keys"] = purge_ttl_keys(broker.url)
            figures["redis_baseline"] = settled_redis_memory(broker.url)
            figures["redis_baseline_census"] = redis_census(broker.url)
            assert isinstance(system, BridgeSystem)
            samplers["rss_kb"] = Sampler(system.rss_kb, 1.0)
            samplers["redis"] = Sampler(lambda: redis_memory(broker.url), 1.0)
            samplers["final"] = Sampler(lambda: ctx.final_count() - base, 1.0)
            for s in samplers.values():
                s.start()
        if during is not None:
            stop_during = during()
        cpu = CpuWindow(
            {
                "worker": system.pids,
                "backend": lambda: process_tree(ctx.backend_pid),
                "redis": lambda: [broker.proc.pid] if broker.proc else [],
            }
        ).start()
        patches0 = ctx.admin.stats()["patches"]
        calls0 = system.serve_calls() if isinstance(system, BridgeSystem) else None
        t_send = time.perf_counter()
        sent = produce(ctx, system.name, broker.url, specs, release, tag, sequential=sequential)
        figures["producer_send_s"] = round(sent.get("send_s", time.perf_counter() - t_send), 3)
        # The backend counts jobs with a full scan: poll less often on big runs.
        wait_final(
            ctx,
            base + len(specs),
            system=system,
            stall_s=600 if soak else 180,
            every_s=0.25 if len(specs) <= 5000 else 1.0,
        )
        figures.update(cpu.stop(len(specs)))
        figures["backend_patches_per_job"] = round(
            (ctx.admin.stats()["patches"] - patches0) / max(1, len(specs)), 3
        )
        if calls0 is not None:
            figures["mean_group"] = _mean_group(calls0, system.serve_calls())
        if stop_during is not None:
            figures["during"] = stop_during()
            stop_during = None
        if sequential:
            figures["sequential"] = sent.get("sequential", [])
        if soak:
            time.sleep(5)  # let the last writes, acks and result stores settle
            figures["series"] = {k: s.stop() for k, s in samplers.items()}
            samplers = {}
            figures["redis_after_drain"] = redis_memory(broker.url)
            figures["redis_census"] = redis_census(broker.url)
            figures["redis_purged_keys"] = purge_ttl_keys(broker.url)
            figures["redis_after_purge"] = settled_redis_memory(broker.url)
            figures["worker_rss_kb_final"] = system.rss_kb()
    finally:
        for s in samplers.values():
            s.stop()
        if stop_during is not None:
            with contextlib.suppress(Exception):
                stop_during()
        system.stop()
        broker.close()
    records = job_records(ctx, tag)
    figures.update(summarize_records(records, len(specs)))
    return figures
