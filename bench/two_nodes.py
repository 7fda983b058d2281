"""A real two-node Ray cluster on one machine, a node lost mid-run (issue 14, item 2).

    .venv/bin/python -m bench.two_nodes [--jobs 2000] [--workers 2] [--kill-at 0.3]

``ray start --head`` (two CPUs) and a second node joined with ``ray start --address``
(one CPU); the example plugin's two replicas (one CPU each) are spread one per node, as
Serve does by default (checked from the actor table). Serve's proxy runs on the head
only (one machine, one port). Two worker processes drain the jobs; at ``--kill-at`` of
them done, the second node's whole process group (its ``ray start --block``, raylet and
workers) is SIGKILLed. Jobs whose serve call was on that node fail over by the worker's
retries to the head's replica. Serve starts a replacement replica on the head's second
CPU (in the runs so far before Ray had marked the node dead); ``--jobs-after`` more jobs
are queued once it runs and must all succeed too. The run passes when every job
succeeded exactly once. Prints the counts (serve requests answered per node, from
Serve's replica logs, where a request can carry several coalesced jobs; seconds from
the kill to the last job final, to the node marked dead, to the replacement running)
and writes them as JSON (``--out``).

Run it alone: it starts its own Ray cluster, and ``ray stop`` is never called (that
would stop every Ray cluster on the machine); the two nodes are stopped by process
group. Needs nothing running beforehand (a throwaway Redis and local backend).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray._private import state as ray_state

from bench.harness import serve_options
from config import get_settings
from devtools.demo_env import DEMO_MODELS, DEMO_USERS, SERVICE_TOKEN, demo_plugin, seed_backend
from devtools.ray_node import start_node, stop_group
from devtools.redis_server import RedisServer
from local_backend.client import AdminClient
from local_backend.server import BackendProcess, free_port
from serve_runtime.deploy import deploy
from worker.submit import submit


def log(msg: str) -> None:
    print(f"[two_nodes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node["Alive"]]


def replica_nodes(app_name: str) -> dict[str, str]:
    """Replica id -> Ray node id, for the live replicas of the app's plugin deployment.

    From the GCS actor table (Ray's state API needs the dashboard, which is off here).
    """
    prefix = f"SERVE_REPLICA::{app_name}#"
    out = {}
    for actor in ray_state.actors(actor_state_name="ALIVE").values():
        name = actor["Name"] or ""
        if name.startswith(prefix) and "#TicketStore#" not in name:
            out[name.rsplit("#", 1)[1]] = actor["Address"]["NodeID"]
    return out


def running_replicas(app_name: str) -> int:
    deployments = serve.status().applications[app_name].deployments
    return sum(
        d.replica_states.get("RUNNING", 0)
        for name, d in deployments.items()
        if name != "TicketStore"
    )


def head_node_id() -> str:
    return next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])


def served_per_replica(logs: Path) -> dict[str, int]:
    """Replica id -> requests it answered with 200, from Serve's replica logs."""
    out: dict[str, int] = {}
    for path in (logs / "serve").glob("replica_*_*.log"):
        if "_TicketStore_" in path.name:
            continue
        replica = path.stem.rsplit("_", 1)[1]
        text = path.read_text(errors="replace")
        out[replica] = sum(
            1 for line in text.splitlines() if "-- POST " in line and " 200 " in line
        )
    return out


def counts(admin: AdminClient, ids: list[str]) -> dict[str, int]:
    """The run's counts as reported: a stopped job counts as failed, one not final as lost."""
    o = admin.outcomes(ids)
    return {
        "submitted": o.submitted,
        "succeeded": o.succeeded,
        "failed": o.failed + o.stopped,
        "lost": o.not_final,
        "written_twice": o.written_twice,
    }


def queue_jobs(admin: AdminClient, plugin: Any, n: int, tag: str) -> list[str]:
    """Create ``n`` jobs on the backend and queue them, models and tenants in turn."""
    ids = [f"two-nodes-{tag}-{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    models = list(DEMO_MODELS)
    specs = []
    for i, job_id in enumerate(ids):
        model = models[i % len(models)]
        tenant = DEMO_MODELS[model]
        token = next(tok for tok, ts in DEMO_USERS.values() if tenant in ts)
        specs.append((job_id, model, tenant, token, {"inputs": [plugin.ROWS[i % 3]]}))
    admin.create_jobs(
        [
            {
                "id": j,
                "tenant": t,
                "plugin_release": plugin.RELEASE,
                "params": {"model": m, "json": b},
            }
            for j, m, t, _, b in specs
        ]
    )
    for j, m, t, tok, b in specs:
        submit(job_id=j, model=m, token=tok, tenant=t, release=plugin.RELEASE, json=b)
    return ids


def first_times(checks: dict[str, Callable[[], bool]], timeout: float) -> dict[str, float]:
    """Seconds until each check first holds, polled side by side; RuntimeError naming
    those that never did."""
    started = time.monotonic()
    seen: dict[str, float] = {}
    while len(seen) < len(checks):
        for name, ready in checks.items():
            if name not in seen and ready():
                seen[name] = time.monotonic() - started
        if time.monotonic() - started > timeout:
            missing = sorted(set(checks) - set(seen))
            raise RuntimeError(f"not within {timeout:.0f}s: {missing}")
        time.sleep(0.5)
    return seen


def run(
    jobs: int, workers: int, kill_at: float, workdir: Path, jobs_after: int | None = None
) -> dict[str, Any]:
    """The run; its counts as a dict (see module docstring)."""
    jobs_after = jobs // 10 if jobs_after is None else jobs_after
    plugin = demo_plugin("classifier")
    redis = RedisServer(workdir=workdir / "redis", appendonly=True).start()
    backend = BackendProcess(workdir / "backend").start()
    head_port, serve_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    procs: list[subprocess.Popen[bytes]] = []
    head = node2 = None
    # Short: Ray's socket paths under it must stay below the 107-byte limit.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    logs = ray_tmpdir / "ray" / "session_latest" / "logs"
    # Both nodes on the loopback interface; Ray's token authentication off for them, as
    # for this driver (Ray reads RAY_AUTH_MODE when it is imported, before this runs).
    # A real cluster keeps it on: docs/scaling.md.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        admin = AdminClient(backend.url)
        seed_backend(admin, workdir, plugin)
        # The head has room for both replicas, so Serve can reschedule the lost one there;
        # Serve spreads replicas over nodes, so at first one runs on each.
        head = start_node(
            [
                "--head",
                f"--port={head_port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--include-dashboard=false",
            ],
            workdir / "ray-head.log",
            ray_tmpdir,
        )
        address = f"127.0.0.1:{head_port}"
        ray.init(address=address, log_to_driver=False)  # waits for the head's GCS
        node2 = start_node(
            [f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
            workdir / "ray-node2.log",
            ray_tmpdir,
        )
        first_times({"2 Ray nodes alive": lambda: len(alive_nodes()) == 2}, 90)
        head_id = head_node_id()
        log(f"Ray: head at {address}, 2 nodes alive")
        env = {
            "SYNAPSE_HOST": backend.url,
            "SYNAPSE_ACCESS_TOKEN": SERVICE_TOKEN,
            "SYNAPSE_SERVE_URL": f"http://127.0.0.1:{serve_port}",
            "SYNAPSE_BRIDGE_SERVE_PORT": str(serve_port),
            "SYNAPSE_BRIDGE_MODEL_DIR": str(workdir / "models"),
            "REDIS_URL": redis.url,
            "SYNAPSE_BRIDGE_RETRY_MAX": "10",
            "SYNAPSE_BRIDGE_RETRY_BASE": "1",
            "SYNAPSE_BRIDGE_RETRY_CAP": "8",
            "SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT": "60",  # redelivery within the run
            "SYNAPSE_BRIDGE_TASK_SOFT_TIME_LIMIT": "30",
            "SYNAPSE_BRIDGE_TASK_TIME_LIMIT": "40",
            "SYNAPSE_BRIDGE_BACKEND_TIMEOUT": "5",
            "SYNAPSE_BRIDGE_METRICS_PORT": "0",
            "SYNAPSE_BRIDGE_LOG_LEVEL": "WARNING",
        }
        os.environ.update(env)
        get_settings.cache_clear()
        serve.start(
            proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": serve_port}
        )
        options = serve_options(
            plugin.PLUGIN_DIR, "inference", num_replicas=2, ray_actor_options={"num_cpus": 1}
        )
        spec = deploy(plugin.PLUGIN_DIR, overrides=options)
        placement = replica_nodes(spec.app_name)
        on_node2 = sorted(r for r, node in placement.items() if node != head_id)
        log(f"deployed {spec.app_name}: replicas {placement}, on node 2: {on_node2}")
        if len(set(placement.values())) != 2:
            raise RuntimeError(f"Serve did not spread the replicas over both nodes: {placement}")
        ids = queue_jobs(admin, plugin, jobs, "a")
        log(f"{jobs} jobs queued; starting {workers} workers")
        started = time.monotonic()
        for i in range(workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker.cli", "worker", "-c", "16"],
                    env={**os.environ, **env},
                    stdout=(workdir / f"worker-{i}.log").open("ab"),
                    stderr=subprocess.STDOUT,
                )
            )
        first_times(
            {
                f"{kill_at:.0%} of the jobs final": lambda: (
                    (c := counts(admin, ids))["succeeded"] + c["failed"] >= kill_at * jobs
                )
            },
            600,
        )
        c = counts(admin, ids)
        done_at_kill = c["succeeded"] + c["failed"]
        stop_group(node2, signal.SIGKILL)
        log(f"second node killed at {done_at_kill} jobs final")
        # The three moments after the kill, each timed from it.
        moments: dict[str, Callable[[], bool]] = {
            "drain": lambda: counts(admin, ids)["lost"] == 0,
            "node_dead": lambda: len(alive_nodes()) == 1,
            "rescheduled": lambda: (
                list(replica_nodes(spec.app_name).values()) == [head_id, head_id]
                and running_replicas(spec.app_name) == 2
            ),
        }
        seen = first_times(moments, timeout=900)
        drain_s, node_dead_s, rescheduled_s = (seen[k] for k in moments)
        log(
            f"after the kill: every job final {drain_s:.1f}s, node dead {node_dead_s:.1f}s, "
            f"two replicas on the head {rescheduled_s:.1f}s"
        )
        after = queue_jobs(admin, plugin, jobs_after, "b")
        first_times({"the later jobs final": lambda: counts(admin, after)["lost"] == 0}, 300)
        elapsed = time.monotonic() - started
        served = served_per_replica(logs)
        at_end = list(replica_nodes(spec.app_name).values())
        c = counts(admin, ids + after)
        result = {
            **c,
            "jobs_before_kill_final": done_at_kill,
            "jobs_queued_after_reschedule": jobs_after,
            "replicas_on_node2_before": len(on_node2),
            "requests_served_by_head": sum(n for r, n in served.items() if r not in on_node2),
            "requests_served_by_node2": sum(n for r, n in served.items() if r in on_node2),
            "replicas_on_head_at_end": at_end.count(head_id),
            "replicas_elsewhere_at_end": len(at_end) - at_end.count(head_id),
            "drain_after_kill_s": round(drain_s, 1),
            "node_dead_after_kill_s": round(node_dead_s, 1),
            "rescheduled_after_kill_s": round(rescheduled_s, 1),
            "elapsed_s": round(elapsed, 1),
            "workers": workers,
        }
        log(json.dumps(result))
        return result
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if ray.is_initialized():
            ray.shutdown()
        for node in (node2, head):
            if node is not None:
                stop_group(node)
        backend.stop()
        redis.close()
        if logs.is_dir():
            shutil.copytree(logs, workdir / "ray-logs", dirs_exist_ok=True, symlinks=True)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.3)
    parser.add_argument(
        "--jobs-after", type=int, default=None, help="queued once Serve has rescheduled (jobs/10)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the counts here (JSON)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="synapse-two-nodes-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.jobs, args.workers, args.kill_at, workdir, args.jobs_after)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    ok = result["lost"] == 0 and result["written_twice"] == 0 and result["failed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
