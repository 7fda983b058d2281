"""``synapse-bridge demo``: the whole loop on one machine, on embedded defaults.

Redis (a throwaway one unless REDIS_URL answers), the local backend seeded with
tenants, users and models, a local Ray with Serve running the example plugin, and a
worker process. It submits jobs over several models and tenants plus one batch job,
follows them to the end, prints a summary, and stops everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config.settings import get_settings
from devtools.demo_env import DEMO_MODELS, DEMO_USERS, demo_plugin, demo_stack
from devtools.redis_server import ensure_redis
from local_backend.client import AdminClient
from serve_runtime.remote import infer_remote
from worker.submit import submit

FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _user_for(tenant: str) -> tuple[str, str]:
    users = [(n, tok) for n, (tok, tenants) in DEMO_USERS.items() if tenant in tenants]
    return users[0]


def serve_figures(console: Console, spec: Any, calls: int, rows: list[Any]) -> dict[str, float]:
    """infer_remote straight to the deployment: the first call loads, the rest are warm."""
    env = {
        "SYNAPSE_HOST": get_settings().require_backend_url(),
        "SYNAPSE_PLUGIN_RELEASE_CHECKSUM": spec.route_prefix.lstrip("/"),
    }

    def one(model_id: int) -> float:
        _, token = _user_for(DEMO_MODELS[model_id])
        t0 = time.perf_counter()
        infer_remote(
            {"model": model_id, "json": {"inputs": rows}, "tenant": DEMO_MODELS[model_id]},
            {**env, "SYNAPSE_ACCESS_TOKEN": token},
        )
        return time.perf_counter() - t0

    first = one(1)
    for model_id in DEMO_MODELS:
        one(model_id)
    warm = [one(1 + i % len(DEMO_MODELS)) for i in range(calls)]
    return {
        "first_ms": first * 1000,
        "warm_p50_ms": percentile(warm, 50) * 1000,
        "warm_p99_ms": percentile(warm, 99) * 1000,
    }


def start_worker(workdir: Path, env: dict[str, str], concurrency: int) -> subprocess.Popen[bytes]:
    log = (workdir / "worker.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker", "-c", str(concurrency)],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while "worker ready" not in (workdir / "worker.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start; see {workdir / 'worker.log'}")
        time.sleep(0.1)
    return proc


def make_jobs(admin: Any, plugin: ModuleType, jobs: int, batch_items: int) -> list[dict[str, Any]]:
    """Jobs on the backend, round-robin over models (and so tenants and users)."""
    specs = []
    model_ids = list(DEMO_MODELS)
    for i in range(jobs):
        model_id = model_ids[i % len(model_ids)]
        tenant = DEMO_MODELS[model_id]
        user = [n for n, (_, ts) in DEMO_USERS.items() if tenant in ts][(i // 4) % 2]
        specs.append(
            {
                "id": uuid.uuid4().hex,
                "tenant": tenant,
                "model": model_id,
                "user": user,
                "json": {"inputs": [plugin.ROWS[i % 3]]},
            }
        )
    if batch_items:
        specs.append(
            {
                "id": uuid.uuid4().hex,
                "tenant": "acme",
                "model": 1,
                "user": "alice",
                "items": [{"inputs": [plugin.ROWS[i % 3]]} for i in range(batch_items)],
            }
        )
    admin.create_jobs(
        [
            {
                "id": s["id"],
                "tenant": s["tenant"],
                "plugin_release": plugin.RELEASE,
                "params": {
                    "model": s["model"],
                    **({"items": s["items"]} if "items" in s else {"json": s["json"]}),
                },
            }
            for s in specs
        ]
    )
    return specs


def run_demo(
    *,
    jobs: int = 300,
    batch_items: int = 200,
    concurrency: int = 16,
    serve_calls: int = 100,
    workdir: Path | None = None,
    serve_port: int = 8100,
    plugin_name: str = "classifier",
) -> int:
    console = Console()
    plugin = demo_plugin(plugin_name)
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="synapse-demo-")))
        with console.status("starting Redis, the local backend and Ray Serve..."):
            redis_url, server = ensure_redis(os.environ.get("REDIS_URL"))
            if server is not None:
                stack.callback(server.close)
            os.environ["REDIS_URL"] = redis_url
            env_stack = stack.enter_context(
                demo_stack(workdir, plugin=plugin, serve_port=serve_port)
            )
        from serve_runtime.deploy import deploy  # Ray: seconds to import, so not for --help

        assert env_stack.backend is not None
        console.print(
            f"Redis {'started at ' + redis_url if server else 'at ' + redis_url}; "
            f"backend at {env_stack.backend.url}; "
            f"Ray up in {env_stack.timings['ray_start_s']:.1f}s"
        )
        t0 = time.perf_counter()
        spec = deploy(plugin.PLUGIN_DIR)
        deploy_s = time.perf_counter() - t0
        console.print(
            f"deployed [bold]{spec.app_name}[/] at {spec.route_prefix} in {deploy_s:.1f}s"
        )
        figures = serve_figures(console, spec, serve_calls, plugin.ROWS)

        worker_env = {
            "REDIS_URL": redis_url,
            "SYNAPSE_BRIDGE_LOG_FORMAT": "json",
            "SYNAPSE_BRIDGE_METRICS_PORT": "0",
        }
        with console.status("starting the worker..."):
            worker = start_worker(workdir, worker_env, concurrency)
        stack.callback(_stop, worker)

        get_settings.cache_clear()  # the worker's app and services read them on first use
        admin = stack.enter_context(AdminClient(env_stack.backend.url))
        specs = make_jobs(admin, plugin, jobs, batch_items)
        started = time.time()
        for s in specs:
            token = DEMO_USERS[s["user"]][0]
            submit(
                job_id=s["id"],
                model=s["model"],
                token=token,
                tenant=s["tenant"],
                release=plugin.RELEASE,
                json=s.get("json"),
                items=s.get("items"),
            )
        done = _follow(console, admin, len(specs), started)
        elapsed = time.time() - started
        results = [admin.job(s["id"]) for s in specs]
        loads = _model_loads(spec)

    by_status: dict[str, int] = {}
    for job in results:
        by_status[job["status"]] = by_status.get(job["status"], 0) + 1
    latencies = [
        j["metrics_record"]["total_s"]
        for j in results
        if j["status"] == "SUCCEEDED"
        and "items" not in (j.get("params") or {})
        and (j.get("metrics_record") or {}).get("total_s") is not None
    ]
    _summary(
        console, by_status, len(specs), elapsed, latencies, loads, deploy_s, figures, results, done
    )
    return 0 if by_status.get("SUCCEEDED", 0) == len(specs) else 1


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _follow(console: Console, admin: Any, total: int, started: float, timeout: float = 600) -> bool:
    columns = (
        TextColumn("jobs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("jobs", total=total, rate="")
        while True:
            counts = admin.stats()["jobs"]
            final = sum(counts.get(s, 0) for s in FINAL)
            rate = final / max(1e-9, time.time() - started)
            progress.update(task, completed=min(final, total), rate=f"{rate:.0f} jobs/s")
            if final >= total:
                return True
            if time.time() - started > timeout:
                return False
            time.sleep(0.2)


def _model_loads(spec: Any) -> int | None:
    try:
        from ray import serve

        names = serve.status().applications[spec.app_name].deployments
        (deployment,) = [name for name in names if name != "TicketStore"]
        handle = serve.get_deployment_handle(deployment, spec.app_name)
        return int(handle.model_stats.remote().result(timeout_s=30)["loads"])
    except Exception:
        return None


def _summary(
    console: Console,
    by_status: dict[str, int],
    total: int,
    elapsed: float,
    latencies: list[float],
    loads: int | None,
    deploy_s: float,
    figures: dict[str, float],
    results: list[dict[str, Any]],
    done: bool,
) -> None:
    table = Table(title="synapse-serve-bridge demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("jobs submitted", str(total))
    for status, n in sorted(by_status.items()):
        table.add_row(f"  {status}", str(n))
    table.add_row("throughput (submit to last final write)", f"{total / elapsed:.1f} jobs/s")
    table.add_row(
        "job latency p50 (submit to SUCCEEDED)", f"{percentile(latencies, 50) * 1000:.0f} ms"
    )
    table.add_row("job latency p99", f"{percentile(latencies, 99) * 1000:.0f} ms")
    table.add_row("model loads on the replica", "?" if loads is None else str(loads))
    table.add_row("deploy the plugin", f"{deploy_s:.1f} s")
    table.add_row("first infer_remote (model load)", f"{figures['first_ms']:.0f} ms")
    table.add_row(
        "warm infer_remote p50 / p99",
        f"{figures['warm_p50_ms']:.1f} / {figures['warm_p99_ms']:.1f} ms",
    )
    console.print(table)
    if not done:
        console.print("[red]not every job finished in time[/]")
    batch = next((j for j in results if "items" in (j.get("params") or {})), None)
    single = next((j for j in results if "json" in (j.get("params") or {})), None)
    if single:
        console.print(
            f"a single job on the backend: {single['id']} {single['status']} "
            f"result={json.dumps(single['result'])[:120]}"
        )
    if batch:
        console.print(
            f"the batch job on the backend: {batch['id']} {batch['status']} "
            f"{len(batch['result'] or [])} results, progress {batch['progress_record']}"
        )
