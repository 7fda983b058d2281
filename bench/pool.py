"""Which Celery pool suits the bridge? Throughput, latency and memory per pool/concurrency.

For each configuration (threads at 4/8/16/32, prefork at 2/4, gevent when importable)
this starts a real ``synapse-bridge worker`` subprocess on a fresh throwaway Redis,
against one seeded local backend and one local Ray Serve running the example plugin,
warms it with a few jobs, then sends a burst of ``--jobs`` single jobs and waits until
the backend shows them all SUCCEEDED. Figures per configuration:

- jobs/s: ``N / (last finished_at - first submitted_at)``, both from the jobs'
  ``metrics_record`` (written by the worker; one clock, one machine);
- p50/p99 latency: the jobs' ``metrics_record.total_s`` (submit -> final write);
- peak RSS: the largest sum of ``VmRSS`` over the worker and its descendants, sampled
  every 0.2 s from ``/proc`` during the worker's life; PSS (shared pages split between
  processes, so prefork's copy-on-write pages count once) is read once after the burst;
- the worker's CPU seconds per job and the machine's busy fraction during the burst.

The producer runs in its own subprocess per configuration (the broker URL is read once
per process), so nothing is reloaded here. Run it::

    .venv/bin/python bench/pool.py [--jobs N] [--repeats R] [--only threads:16,prefork:4]

It writes ``bench/results/pool.json`` and ``bench/POOL.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "pool.json"
REPORT = ROOT / "bench" / "POOL.md"
RELEASE = {"code": "example-classifier", "version": "1.0.0"}
BODY = {"inputs": [[5.0, 3.4, 1.5, 0.2]]}
# Models 1-3: the example deployment keeps at most 3 models per replica
# (max_models_per_replica), so a 4th would make the replica evict and reload models
# during the burst, and the figures would measure loads, not the pool.
MODELS = (1, 2, 3)
CONFIGS = [
    ("threads", 4),
    ("threads", 8),
    ("threads", 16),
    ("threads", 32),
    ("prefork", 2),
    ("prefork", 4),
    ("gevent", 32),
]
SAMPLE_EVERY_S = 0.2
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# --- /proc readers ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in seen or not os.path.exists(f"/proc/{p}"):
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def rss_kb(pid: int) -> int:
    with suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    with suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (its own, not its reaped children's)."""
    with suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    return 0


def cpu_ticks_with_reaped(pid: int) -> int:
    """utime + stime + cutime + cstime: ``pid`` and its children that have exited."""
    with suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15])
    return 0


def own_tree_ticks() -> int:
    """CPU of this benchmark: this process and all it started (backend, Ray, Redis, the
    worker, the producers), so the machine's other load is what is left."""
    return sum(cpu_ticks_with_reaped(p) for p in process_tree(os.getpid()))


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def mem_total_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


class TreeSampler(threading.Thread):
    """Samples the RSS of a process tree; remembers the peak and each pid's CPU ticks."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss_kb = 0
        self.peak_processes = 0
        self.ticks: dict[int, int] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = process_tree(self.pid)
        total = sum(rss_kb(p) for p in pids)
        if total > self.peak_rss_kb:
            self.peak_rss_kb = total
            self.peak_processes = len(pids)
        for p in pids:
            t = cpu_ticks(p)
            if t:
                self.ticks[p] = t

    def cpu_s(self) -> float:
        return sum(self.ticks.values()) / CLK_TCK

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_EVERY_S):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()


# --- the producer (a subprocess, so the broker URL is read fresh) ---------------------


def produce(spec_path: Path) -> None:
    """Send the jobs listed in ``spec_path`` once told to; print JSON timings.

    Prints ``ready`` after the imports and waits for a line on stdin, so the import's
    CPU falls outside the measured window.
    """
    jobs = json.loads(spec_path.read_text())
    from worker.submit import submit

    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    for job in jobs:
        submit(
            job_id=job["id"],
            model=job["model"],
            token=job["token"],
            tenant=job["tenant"],
            release=RELEASE,
            json=BODY,
        )
    print(json.dumps({"sent": len(jobs), "first_send": t0, "send_s": time.time() - t0}))


# --- the orchestrator ------------------------------------------------------------------


@dataclass
class Env:
    admin: Any  # local_backend.client.AdminClient
    workdir: Path
    base_env: dict[str, str]
    tokens: dict[str, str]  # tenant -> a member's token
    backend_pid: int


def tree_ticks(pid: int) -> int:
    return sum(cpu_ticks(p) for p in process_tree(pid))


def job_specs(prefix: str, n: int, tokens: dict[str, str]) -> list[dict[str, Any]]:
    from devtools.demo_env import DEMO_MODELS

    out = []
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        tenant = DEMO_MODELS[model]
        out.append({"id": f"{prefix}-{i:05d}", "model": model, "tenant": tenant})
    return out


class Producer:
    """Creates the jobs on the backend and sends them from a subprocess, on ``go()``."""

    def __init__(self, env: Env, prefix: str, n: int, redis_url: str) -> None:
        specs = job_specs(prefix, n, env.tokens)
        env.admin.create_jobs(
            [
                {
                    "id": s["id"],
                    "tenant": s["tenant"],
                    "plugin_release": RELEASE,
                    "params": {"model": s["model"], "json": BODY},
                }
                for s in specs
            ]
        )
        self.spec_path = env.workdir / f"{prefix}.jobs.json"
        self.spec_path.write_text(
            json.dumps([{**s, "token": env.tokens[s["tenant"]]} for s in specs])
        )
        self.err_path = env.workdir / f"{prefix}.producer.log"
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--produce", str(self.spec_path)],
                env={**env.base_env, "REDIS_URL": redis_url},
                cwd=str(ROOT),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"producer failed: {self.err_path.read_text()[-3000:]}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.spec_path.unlink(missing_ok=True)

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            out = self.proc.stdout.read()
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.spec_path.unlink(missing_ok=True)
        if self.proc.returncode != 0:
            raise RuntimeError(f"producer failed: {self.err_path.read_text()[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])


def wait_succeeded(
    env: Env, target: int, worker: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Until the backend counts ``target`` SUCCEEDED jobs; fail fast on FAILED or a dead worker."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = env.admin.stats()["jobs"]
        if jobs.get("FAILED", 0):
            raise RuntimeError(f"{jobs['FAILED']} jobs FAILED; see {log}")
        if jobs.get("SUCCEEDED", 0) >= target:
            return
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited ({worker.returncode}); see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{jobs} after {timeout:.0f}s (want {target} SUCCEEDED); see {log}")
        time.sleep(0.25)


def stop_worker(proc: subprocess.Popen[bytes]) -> float:
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return time.monotonic() - t0


# The pool a worker banner names (".> concurrency: 4 (prefork)") for each --pool.
EFFECTIVE = {"threads": "thread", "prefork": "prefork", "gevent": "gevent"}


def worker_command(pool: str, concurrency: int) -> list[str]:
    cmd = [sys.executable, "-m", "worker.cli", "worker", "--pool", pool, "-c", str(concurrency)]
    if pool == "prefork":
        # `--pool prefork` alone runs the *threads* pool: Celery's --pool option reads the
        # value "prefork" as "not given" and substitutes the app's configured worker_pool
        # ("threads", worker/app.py). "processes" is Celery's alias for the same prefork
        # pool that escapes that substitution; it reaches Celery as an extra argument.
        cmd += ["--", "--pool=processes"]
    return cmd


def effective_pool(log: Path) -> str | None:
    """The pool the worker's startup banner names, e.g. "thread" or "prefork"."""
    for line in log.read_text(errors="replace").splitlines():
        if ".> concurrency:" in line and "(" in line:
            return line.rsplit("(", 1)[1].split(")", 1)[0].strip()
    return None


def run_config(env: Env, pool: str, concurrency: int, n: int, warmup: int, tag: str) -> dict:
    from devtools.redis_server import RedisServer

    redis = RedisServer().start()
    log = env.workdir / f"worker-{tag}.log"
    wenv = {
        **env.base_env,
        "REDIS_URL": redis.url,
        "SYNAPSE_BRIDGE_METRICS_PORT": "0",
        "SYNAPSE_BRIDGE_LOG_FORMAT": "json",
        "SYNAPSE_BRIDGE_LOG_LEVEL": "WARNING",
    }
    t_start = time.monotonic()
    cmd = worker_command(pool, concurrency)
    with log.open("ab") as logf:
        proc = subprocess.Popen(
            cmd,
            env=wenv,
            cwd=str(ROOT),
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for a last-resort kill
        )
    sampler = TreeSampler(proc.pid)
    sampler.start()
    producers: list[Producer] = []
    try:
        before = env.admin.stats()["jobs"].get("SUCCEEDED", 0)
        # Warm-up: readiness (the first job done means the worker consumes), the
        # worker's pooled connections, and, for prefork, the children's clients.
        warm = Producer(env, f"{tag}-warm", warmup, redis.url)
        producers.append(warm)
        warm.go()
        warm.finish()
        wait_succeeded(env, before + warmup, proc, log, timeout=120)
        ready_s = time.monotonic() - t_start
        effective = effective_pool(log)
        if effective != EFFECTIVE[pool]:
            raise RuntimeError(
                f"asked for {pool}, the worker runs {effective!r} (see its banner in {log})"
            )
        time.sleep(0.5)  # let the warm-up's final writes settle
        producer = Producer(env, f"{tag}-run", n, redis.url)  # imported, waiting
        producers.append(producer)
        sampler.sample()
        ticks_before = dict(sampler.ticks)
        busy0, total0 = machine_ticks()
        backend0 = tree_ticks(env.backend_pid)
        own0 = own_tree_ticks()

        producer.go()
        wait_succeeded(env, before + warmup + n, proc, log, timeout=300)
        sent = producer.finish()
        own1 = own_tree_ticks()
        busy1, total1 = machine_ticks()
        backend_cpu_s = (tree_ticks(env.backend_pid) - backend0) / CLK_TCK
        sampler.sample()
        pids = process_tree(proc.pid)
        pss = sum(pss_kb(p) for p in pids)
        rss_now = sum(rss_kb(p) for p in pids)
        cpu_run_s = sum(t - ticks_before.get(p, 0) for p, t in sampler.ticks.items()) / CLK_TCK
    finally:
        try:
            stop_s = stop_worker(proc)
        finally:
            for p in producers:
                p.kill()
            sampler.stop()
            redis.close()

    records = [
        j["metrics_record"]
        for j in env.admin.jobs(status="SUCCEEDED")
        if j["id"].startswith(f"{tag}-run-")
    ]
    if len(records) != n:
        raise RuntimeError(f"{len(records)} SUCCEEDED run jobs, want {n}")
    totals = [r["total_s"] for r in records]
    waits = [r["queue_wait_s"] for r in records]
    service = [r["finished_at"] - r["started_at"] for r in records]
    infer = [r["inference_s"] for r in records]
    first = min(r["submitted_at"] for r in records)
    last = max(r["finished_at"] for r in records)
    span = last - first
    return {
        "pool": pool,
        "concurrency": concurrency,
        "jobs": n,
        "warmup_jobs": warmup,
        "span_s": round(span, 3),
        "jobs_per_s": round(n / span, 2),
        "latency_ms": {
            "p50": round(percentile(totals, 50) * 1000, 1),
            "p99": round(percentile(totals, 99) * 1000, 1),
            "mean": round(statistics.fmean(totals) * 1000, 1),
            "max": round(max(totals) * 1000, 1),
        },
        "queue_wait_ms_p50": round(percentile(waits, 50) * 1000, 1),
        "service_ms": {  # started -> final write, per job (what a slot is busy for)
            "p50": round(percentile(service, 50) * 1000, 1),
            "p99": round(percentile(service, 99) * 1000, 1),
        },
        "inference_ms": {  # the serve call alone
            "p50": round(percentile(infer, 50) * 1000, 1),
            "p99": round(percentile(infer, 99) * 1000, 1),
        },
        "producer_send_s": round(sent["send_s"], 3),
        "attempts_max": max(r.get("attempts", 1) for r in records),
        "workers_seen": len({r.get("worker") for r in records}),
        "peak_rss_mb": round(sampler.peak_rss_kb / 1024, 1),
        "peak_processes": sampler.peak_processes,
        "rss_after_run_mb": round(rss_now / 1024, 1),
        "pss_after_run_mb": round(pss / 1024, 1),
        "worker_cpu_s_run": round(cpu_run_s, 2),
        "worker_cpu_ms_per_job": round(cpu_run_s / n * 1000, 2),
        # All the CPU this benchmark's processes spent per job (worker, backend, Ray
        # Serve, Redis, producer): the cost of a job, unlike jobs/s, barely moved by
        # other load on the machine.
        "stack_cpu_ms_per_job": round((own1 - own0) / CLK_TCK / n * 1000, 2),
        "machine_busy_during_run": round((busy1 - busy0) / max(1, total1 - total0), 3),
        # The share of all CPUs that processes outside this benchmark used meanwhile
        # (other work on a shared machine): a run with much of it is slowed from outside.
        "other_load_during_run": round(
            max(0, (busy1 - busy0) - (own1 - own0)) / max(1, total1 - total0), 3
        ),
        # jobs/s scaled up by the CPU share the other load took: an estimate of the rate
        # on a machine of our own (sound only while the run is CPU-bound).
        "jobs_per_s_alone_est": round(
            n
            / span
            / max(0.05, 1 - max(0, (busy1 - busy0) - (own1 - own0)) / max(1, total1 - total0)),
            2,
        ),
        # Where the CPU went during the burst, per job: the worker, the local backend,
        # and everything else (Ray Serve proxy and replica, Redis, the producer).
        "cpu_ms_per_job": {
            "worker": round(cpu_run_s / n * 1000, 2),
            "backend": round(backend_cpu_s / n * 1000, 2),
            "rest": round(((busy1 - busy0) / CLK_TCK - cpu_run_s - backend_cpu_s) / n * 1000, 2),
            "of_which_other_load": round(
                max(0, (busy1 - busy0) - (own1 - own0)) / CLK_TCK / n * 1000, 2
            ),
        },
        "worker_banner_pool": effective,
        "worker_command": " ".join(["python", *cmd[1:]]),
        "ready_s": round(ready_s, 2),
        "stop_s": round(stop_s, 2),
    }


def warm_serve(tokens: dict[str, str]) -> float:
    """One direct call per model, so the model loads happen before any configuration."""
    from devtools.demo_env import DEMO_MODELS
    from serve_runtime.client import default_client
    from worker.message import Release

    route = Release(**RELEASE).route_prefix
    t0 = time.perf_counter()
    for model in MODELS:
        tenant = DEMO_MODELS[model]
        default_client().infer(route, BODY, model=model, token=tokens[tenant], tenant=tenant)
    return time.perf_counter() - t0


def versions() -> dict[str, str]:
    import celery
    import kombu
    import ray
    import redis

    out = {
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "ray": ray.__version__,
        "redis_py": redis.__version__,
    }
    with suppress(Exception):
        out["redis_server"] = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.split()[2]
    return out


def gevent_available() -> bool:
    try:
        import gevent  # noqa: F401  # type: ignore[import-not-found]
    except ImportError:
        return False
    return True


def pool_accepted(pool: str) -> bool:
    """Whether ``synapse-bridge worker --pool`` takes this pool name."""
    from worker.cli import worker

    for p in worker.params:
        if p.name == "pool":
            return pool in p.type.choices  # type: ignore[attr-defined]
    return False


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per configuration: means over the repeats (peaks: the largest), plus each
    run's jobs/s and latencies to show the spread."""

    def mean(get: Any, nd: int = 1) -> float:
        return round(statistics.fmean(get(r) for r in runs), nd)

    out = dict(runs[0])
    out.update(
        {
            "repeats": len(runs),
            "span_s": mean(lambda r: r["span_s"], 3),
            "jobs_per_s": mean(lambda r: r["jobs_per_s"], 2),
            "latency_ms": {
                k: mean(lambda r, k=k: r["latency_ms"][k]) for k in runs[0]["latency_ms"]
            },
            "queue_wait_ms_p50": mean(lambda r: r["queue_wait_ms_p50"]),
            "service_ms": {k: mean(lambda r, k=k: r["service_ms"][k]) for k in ("p50", "p99")},
            "inference_ms": {k: mean(lambda r, k=k: r["inference_ms"][k]) for k in ("p50", "p99")},
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "pss_after_run_mb": max(r["pss_after_run_mb"] for r in runs),
            "rss_after_run_mb": max(r["rss_after_run_mb"] for r in runs),
            "worker_cpu_ms_per_job": mean(lambda r: r["worker_cpu_ms_per_job"], 2),
            "stack_cpu_ms_per_job": mean(lambda r: r["stack_cpu_ms_per_job"], 2),
            "cpu_ms_per_job": {
                k: mean(lambda r, k=k: r["cpu_ms_per_job"][k], 2) for k in runs[0]["cpu_ms_per_job"]
            },
            "machine_busy_during_run": mean(lambda r: r["machine_busy_during_run"], 3),
            "other_load_during_run": mean(lambda r: r["other_load_during_run"], 3),
            "other_load_all": [r["other_load_during_run"] for r in runs],
            "jobs_per_s_alone_est": mean(lambda r: r["jobs_per_s_alone_est"], 2),
            "jobs_per_s_alone_est_all": [r["jobs_per_s_alone_est"] for r in runs],
            "jobs_per_s_all": [r["jobs_per_s"] for r in runs],
            "p50_ms_all": [r["latency_ms"]["p50"] for r in runs],
            "p99_ms_all": [r["latency_ms"]["p99"] for r in runs],
            "peak_rss_mb_all": [r["peak_rss_mb"] for r in runs],
        }
    )
    for k in ("producer_send_s", "ready_s", "stop_s"):
        out.pop(k, None)
    return out


def write_report(result: dict[str, Any]) -> None:
    rows = result["summary"]
    lines = [
        "# Celery pool for the bridge: threads vs prefork",
        "",
        "Generated by `bench/pool.py`; raw figures in `bench/results/pool.json`. Rerun:",
        "",
        "```",
        ".venv/bin/python bench/pool.py [--jobs N] [--repeats R]",
        "```",
        "",
        f"Machine: {result['machine']['cores']} cores, "
        f"{result['machine']['memory_gb']} GB; Python {result['versions']['python']}, "
        f"Celery {result['versions']['celery']}, Ray {result['versions']['ray']}. "
        f"{result['params']['jobs']} single jobs per configuration, sent as one burst "
        f"after {result['params']['warmup']} warm-up jobs; "
        f"{result['params']['repeats']} repeat(s) per configuration (order reversed on "
        "odd repeats), means shown, peaks the largest, each run's jobs/s in brackets "
        "(every run in the JSON). Latency is each job's `metrics_record.total_s` "
        "(submit to final write), so under a burst it is mostly queue wait.",
        "",
        "| pool | concurrency | jobs/s | p50 ms | p99 ms | peak RSS MB | PSS MB | "
        "service p50 ms | worker CPU ms/job | stack CPU ms/job | machine busy | other load | "
        "jobs/s alone (est.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spread = ""
        if r["repeats"] > 1:
            spread = " (" + ", ".join(f"{x:.1f}" for x in r["jobs_per_s_all"]) + ")"
        lines.append(
            f"| {r['pool']} | {r['concurrency']} | {r['jobs_per_s']:.1f}{spread} | "
            f"{r['latency_ms']['p50']:.0f} | {r['latency_ms']['p99']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['pss_after_run_mb']:.0f} | "
            f"{r['service_ms']['p50']:.1f} | {r['worker_cpu_ms_per_job']:.1f} | "
            f"{r['stack_cpu_ms_per_job']:.1f} | "
            f"{r['machine_busy_during_run'] * 100:.0f}% | "
            + "/".join(f"{x * 100:.0f}%" for x in r["other_load_all"])
            + f" | {r['jobs_per_s_alone_est']:.1f} |"
        )
    lines += [""]
    for note in result["notes"]:
        lines.append(f"- {note}")
    lines += [
        "",
        "Columns: *peak RSS* is the largest sampled sum of `VmRSS` over the worker and "
        "its children (prefork children share copy-on-write pages, so the sum "
        "overcounts them; *PSS*, read once after the burst, splits shared pages). "
        "*service* is started to final write of one job (a slot's busy time: a backend "
        "GET, a RUNNING PATCH, the serve call, the final PATCH). *machine busy* is the "
        "share of all CPUs busy during the burst (backend, Ray Serve, Redis, the worker "
        "and the producer all share this machine); *stack CPU* is the CPU all the "
        "processes this benchmark started spent per job (the job's cost, which sets the "
        "ceiling on a CPU-bound machine); *other load* is the share taken by "
        "processes this benchmark did not start, per run (on a shared machine it slows "
        "the runs it falls on); *jobs/s alone (est.)* is each run's jobs/s divided by "
        "(1 - other load), averaged: a rough estimate of the rate without that load, "
        "sound only while the runs are CPU-bound.",
        "",
        "## Conclusion",
        "",
        result.get("conclusion", "(not written)"),
        "",
    ]
    REPORT.write_text("\n".join(lines))


def _label(r: dict[str, Any]) -> str:
    return f"{r['pool']} -c {r['concurrency']}"


def conclusion(rows: list[dict[str, Any]], cores: int) -> str:
    """The report's paragraph, read off the numbers by fixed rules (no hand-tuning)."""
    best = max(rows, key=lambda r: r["jobs_per_s"])
    worst = min(rows, key=lambda r: r["jobs_per_s"])
    gap = (best["jobs_per_s"] - worst["jobs_per_s"]) / best["jobs_per_s"]
    spreads = [
        (max(r["jobs_per_s_all"]) - min(r["jobs_per_s_all"])) / r["jobs_per_s"]
        for r in rows
        if r["repeats"] > 1
    ]
    noise = max(spreads) if spreads else None
    small = gap < 0.10 or (noise is not None and gap <= noise)
    parts = [
        f"On this {cores}-core machine every configuration lands between "
        f"{worst['jobs_per_s']:.1f} ({_label(worst)}) and {best['jobs_per_s']:.1f} jobs/s "
        f"({_label(best)}), a {gap * 100:.0f}% gap"
        + (
            f", against a run-to-run spread of up to {noise * 100:.0f}% for one configuration."
            if noise is not None
            else " (one run each: no measure of run-to-run noise; use --repeats)."
        )
    ]
    busy = statistics.fmean(r["machine_busy_during_run"] for r in rows)
    cpu = {
        k: statistics.fmean(r["cpu_ms_per_job"][k] for r in rows) for k in rows[0]["cpu_ms_per_job"]
    }
    own = statistics.fmean(r["stack_cpu_ms_per_job"] for r in rows)
    serving = own - cpu["worker"] - cpu["backend"]
    cheap = min(rows, key=lambda r: r["stack_cpu_ms_per_job"])
    dear = max(rows, key=lambda r: r["stack_cpu_ms_per_job"])
    if busy >= 0.80:
        parts.append(
            f"The bursts kept the CPUs {busy * 100:.0f}% busy on average. A job cost the "
            f"benchmark's processes {own:.0f} ms of CPU on average (from "
            f"{cheap['stack_cpu_ms_per_job']:.0f} ms with {_label(cheap)} to "
            f"{dear['stack_cpu_ms_per_job']:.0f} ms with {_label(dear)}): the worker "
            f"{cpu['worker']:.0f} ms, the local backend {cpu['backend']:.0f} ms, Ray Serve's "
            f"proxy and replica with Redis and the producer {serving:.0f} ms. That caps "
            f"{cores} cores near {cores * 1000 / own:.0f} jobs/s whatever the pool: the "
            f"ceiling is the shared CPU ({serving / own * 100:.0f}% of it spent on the "
            f"serving side, {cpu['worker'] / own * 100:.0f}% in the worker), not the "
            "worker's pool, so beyond a few slots more concurrency only stretches each "
            "job's service time"
        )
        by_c = sorted((r for r in rows if r["pool"] == "threads"), key=lambda r: r["concurrency"])
        if len(by_c) > 1:
            lo, hi = by_c[0], by_c[-1]
            parts[-1] += (
                f" (threads: {lo['service_ms']['p50']:.0f} ms at -c {lo['concurrency']}, "
                f"{hi['service_ms']['p50']:.0f} ms at -c {hi['concurrency']})"
            )
        parts[-1] += "."
    other_max = max(max(r["other_load_all"]) for r in rows)
    if other_max > 0.05:
        parts.append(
            f"Other work on this shared machine took up to {other_max * 100:.0f}% of the CPU "
            "during some runs (column *other load*), which accounts for much of the spread."
        )
        est = sorted(rows, key=lambda r: r["jobs_per_s_alone_est"])
        parts.append(
            "Scaled by the CPU share that load left (an estimate), the configurations come "
            f"to {est[0]['jobs_per_s_alone_est']:.0f}-{est[-1]['jobs_per_s_alone_est']:.0f} "
            "jobs/s: "
            + ", ".join(f"{_label(r)} {r['jobs_per_s_alone_est']:.0f}" for r in est)
            + "."
        )
    parts.append(
        "Latency is measured from submit under a burst, so p50 and p99 are mostly queue "
        "wait and follow jobs/s."
    )
    threads = [r for r in rows if r["pool"] == "threads"]
    prefork = [r for r in rows if r["pool"] == "prefork"]
    if threads and prefork:
        t_lo = min(threads, key=lambda r: r["concurrency"])
        t_hi = max(threads, key=lambda r: r["concurrency"])
        p_hi = max(prefork, key=lambda r: r["concurrency"])
        parts.append(
            f"Memory is where the pools differ: threads stay one process "
            f"({t_lo['peak_rss_mb']:.0f} MB at -c {t_lo['concurrency']}, "
            f"{t_hi['peak_rss_mb']:.0f} MB at -c {t_hi['concurrency']}), prefork adds a "
            f"process per slot ({p_hi['peak_rss_mb']:.0f} MB RSS, "
            f"{p_hi['pss_after_run_mb']:.0f} MB PSS at -c {p_hi['concurrency']})."
        )
        bt = max(threads, key=lambda r: r["jobs_per_s"])
        bp = max(prefork, key=lambda r: r["jobs_per_s"])
        # Tied with the best: a mean within the largest run-to-run spread of the best.
        tol = noise if noise is not None else 0.10
        tied = [
            r for r in rows if (best["jobs_per_s"] - r["jobs_per_s"]) <= tol * best["jobs_per_s"]
        ]
        behind = [r for r in rows if r not in tied]

        if len(tied) > 1:
            parts.append(
                f"{_label(best)} has the highest mean, but "
                + ", ".join(_label(r) for r in tied if r is not best)
                + (" is" if len(tied) == 2 else " are")
                + f" within {tol * 100:.0f}% of it, i.e. tied within the noise"
                + (
                    "; behind: "
                    + "; ".join(f"{_label(r)} ({r['jobs_per_s']:.1f} jobs/s)" for r in behind)
                    + "."
                    if behind
                    else "."
                )
            )
        idle = [r for r in rows if r["machine_busy_during_run"] < busy - 0.08]
        if idle:
            parts.append(
                ", ".join(
                    f"{_label(r)} kept the CPUs only {r['machine_busy_during_run'] * 100:.0f}% busy"
                    for r in idle
                )
                + f" (mean {busy * 100:.0f}%): too few slots to keep the serving side fed."
            )
        if small or (noise is not None and bt in tied and bp in tied):
            parts.append(
                "So no configuration wins on speed here; the default `--pool threads` is "
                "justified by memory (one process at any concurrency, "
                f"{bt['peak_rss_mb']:.0f} MB at -c {bt['concurrency']} against "
                f"{bp['peak_rss_mb']:.0f} MB for {_label(bp)}) and by concurrency that is "
                "cheap to raise when the serving side has capacity to spare, not by "
                "measured throughput."
            )
        elif best["pool"] == "threads":
            parts.append(
                f"{_label(best)} wins by {gap * 100:.0f}% over the slowest and beats the "
                f"best prefork ({_label(bp)}, {bp['jobs_per_s']:.1f} jobs/s) with one "
                "process: the default `--pool threads` holds."
            )
        else:
            ahead = (best["jobs_per_s"] / bt["jobs_per_s"] - 1) * 100
            parts.append(
                f"{_label(best)} is fastest, {ahead:.0f}% "
                f"ahead of the best threads ({_label(bt)}, {bt['jobs_per_s']:.1f} jobs/s), at "
                f"{best['peak_rss_mb'] / bt['peak_rss_mb']:.1f}x its memory; weigh that "
                "before changing the default."
            )
    return " ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=400, help="single jobs per configuration")
    ap.add_argument("--warmup", type=int, default=24, help="warm-up jobs per configuration")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration")
    ap.add_argument("--only", default=None, help="e.g. threads:16,prefork:4")
    ap.add_argument("--serve-port", type=int, default=8100)
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print, write no files")
    ap.add_argument("--produce", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.produce is not None:
        produce(args.produce)
        return 0

    from devtools.demo_env import DEMO_USERS, EXAMPLE_PLUGIN, demo_stack
    from local_backend.client import AdminClient
    from serve_runtime.deploy import deploy

    configs = CONFIGS
    if args.only:
        wanted = {(p, int(c)) for p, c in (x.split(":") for x in args.only.split(","))}
        configs = [c for c in CONFIGS if c in wanted] + sorted(wanted - set(CONFIGS))
    notes: list[str] = []
    if any(p == "prefork" for p, _ in configs):
        notes.append(
            "prefork: started as `worker --pool prefork -c N -- --pool=processes`, because "
            "`--pool prefork` alone runs the threads pool (Celery treats the value "
            '`prefork` as its default and replaces it by the app\'s `worker_pool="threads"`); '
            "each run checks the pool named in the worker's banner."
        )
    if any(p == "gevent" for p, _ in configs):
        if not gevent_available():
            notes.append("gevent: skipped, not importable (not a dependency of the project).")
            configs = [c for c in configs if c[0] != "gevent"]
        elif not pool_accepted("gevent"):
            notes.append(
                "gevent: skipped; importable, but `synapse-bridge worker --pool` does not "
                "accept it (threads, prefork, solo)."
            )
            configs = [c for c in configs if c[0] != "gevent"]

    tokens: dict[str, str] = {}
    for _name, (token, tenants) in DEMO_USERS.items():
        for t in tenants:
            tokens.setdefault(t, token)

    wall0 = time.monotonic()
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="synapse-bench-pool-") as tmp:
        workdir = Path(tmp)
        with demo_stack(workdir, serve_port=args.serve_port, num_cpus=args.num_cpus) as stack:
            t0 = time.perf_counter()
            spec = deploy(EXAMPLE_PLUGIN)
            deploy_s = time.perf_counter() - t0
            warm_s = warm_serve(tokens)
            print(
                f"stack up: ray {stack.timings['ray_start_s']:.1f}s, deploy {deploy_s:.1f}s "
                f"({spec.route_prefix}), model loads {warm_s:.1f}s",
                flush=True,
            )
            base_env = {**os.environ}
            base_env.pop("REDIS_URL", None)
            base_env.pop("BROKER_URL", None)
            with AdminClient(stack.backend.url) as admin:  # type: ignore[union-attr]
                env = Env(
                    admin=admin,
                    workdir=workdir,
                    base_env=base_env,
                    tokens=tokens,
                    backend_pid=stack.backend.proc.pid,  # type: ignore[union-attr]
                )
                for rep in range(args.repeats):
                    # Alternate the order between repeats, so drift does not favour one end.
                    order = configs if rep % 2 == 0 else list(reversed(configs))
                    for pool, conc in order:
                        tag = f"{pool}{conc}-r{rep}"
                        r = run_config(env, pool, conc, args.jobs, args.warmup, tag)
                        runs[(pool, conc)].append(r)
                        print(
                            f"{pool:8s} -c {conc:<3d} rep {rep}: {r['jobs_per_s']:7.1f} jobs/s  "
                            f"p50 {r['latency_ms']['p50']:7.0f} ms  "
                            f"p99 {r['latency_ms']['p99']:7.0f} ms  "
                            f"service p50 {r['service_ms']['p50']:6.1f} ms  "
                            f"RSS {r['peak_rss_mb']:6.0f} MB  PSS {r['pss_after_run_mb']:5.0f} MB  "
                            "cpu ms/job "
                            + "/".join(f"{k} {v:.1f}" for k, v in r["cpu_ms_per_job"].items())
                            + "  "
                            f"busy {r['machine_busy_during_run'] * 100:.0f}%",
                            flush=True,
                        )
    wall = time.monotonic() - wall0
    summary = [summarize(runs[c]) for c in configs]
    result: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "bench/pool.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cores": os.cpu_count(),
            "memory_gb": round(mem_total_kb() / 1024 / 1024, 1),
            "platform": platform.platform(),
        },
        "versions": versions(),
        "params": {
            "jobs": args.jobs,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "models": list(MODELS),
            "body": BODY,
            "release": RELEASE,
            "ray_num_cpus": args.num_cpus,
        },
        "stack": {"ray_start_s": round(stack.timings["ray_start_s"], 2), "deploy_s": deploy_s},
        "notes": notes,
        "wall_s": round(wall, 1),
        "summary": summary,
        "runs": [r for c in configs for r in runs[c]],
    }
    result["conclusion"] = conclusion(summary, os.cpu_count() or 0)
    print(f"wall {wall:.0f}s")
    print(result["conclusion"])
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        write_report(result)
        print(f"wrote {RESULTS.relative_to(ROOT)} and {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
