"""``synapse-bridge demo``: the whole loop on one machine, on embedded defaults."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from worker.demo_env import DEMO_MODELS, DEMO_USERS, EXAMPLE_PLUGIN, demo_stack

ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0], [5.9, 2.8, 4.3, 1.3]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _user_for(tenant: str) -> tuple[str, str]:
    for name, (token, tenants) in DEMO_USERS.items():
        if tenant in tenants:
            return name, token
    raise LookupError(tenant)


def serve_calls(console: Console, calls: int) -> dict[str, Any]:
    """infer_remote against the deployed example: the first call loads, the rest are warm."""
    from config import get_settings
    from serve_runtime.deploy import deploy
    from serve_runtime.remote import infer_remote

    started = time.perf_counter()
    spec = deploy(EXAMPLE_PLUGIN)
    deploy_s = time.perf_counter() - started
    console.print(f"deployed [bold]{spec.app_name}[/] at {spec.route_prefix} in {deploy_s:.1f}s")

    settings = get_settings()
    env = {
        "SYNAPSE_HOST": settings.require_backend_url(),
        "SYNAPSE_PLUGIN_RELEASE_CHECKSUM": spec.route_prefix.lstrip("/"),
    }

    def one(model_id: int) -> tuple[float, dict[str, Any]]:
        _, token = _user_for(DEMO_MODELS[model_id])
        ctx = {**env, "SYNAPSE_ACCESS_TOKEN": token}
        t0 = time.perf_counter()
        out = infer_remote(
            {"model": model_id, "json": {"inputs": ROWS}, "tenant": DEMO_MODELS[model_id]}, ctx
        )
        return time.perf_counter() - t0, out

    first_s, first = one(1)
    console.print(
        f"first request (model load included): {first_s * 1000:.0f} ms -> {first['predictions']}"
    )
    for model_id in DEMO_MODELS:  # load the others once, outside the warm figures
        one(model_id)
    warm: list[float] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("warm infer_remote calls", total=calls)
        for i in range(calls):
            dt, _ = one(1 + i % len(DEMO_MODELS))
            warm.append(dt)
            progress.advance(task)
    return {
        "deploy_s": deploy_s,
        "first_ms": first_s * 1000,
        "warm_p50_ms": percentile(warm, 50) * 1000,
        "warm_p99_ms": percentile(warm, 99) * 1000,
        "warm_mean_ms": statistics.fmean(warm) * 1000,
        "calls": calls,
    }


def run_demo(*, calls: int = 200, workdir: Path | None = None, serve_port: int = 8100) -> int:
    console = Console()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="synapse-demo-")
        workdir = Path(tmp.name)
    try:
        with console.status("starting the local backend and Ray Serve..."):
            ctx = demo_stack(workdir, serve_port=serve_port)
            stack = ctx.__enter__()
        try:
            console.print(
                f"local backend at {stack.backend.url if stack.backend else '?'}; "
                f"Ray started in {stack.timings['ray_start_s']:.1f}s"
            )
            figures = serve_calls(console, calls)
        finally:
            with console.status("stopping everything the demo started..."):
                ctx.__exit__(None, None, None)
    finally:
        if tmp is not None:
            tmp.cleanup()
    table = Table(title="serve runtime")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("deploy example plugin", f"{figures['deploy_s']:.2f} s")
    table.add_row("first request (load)", f"{figures['first_ms']:.0f} ms")
    table.add_row(f"warm p50 ({figures['calls']} calls)", f"{figures['warm_p50_ms']:.1f} ms")
    table.add_row("warm p99", f"{figures['warm_p99_ms']:.1f} ms")
    console.print(table)
    return 0
