"""Wait for the jobs `synapse-bridge submit` created (its JSON lines in FILE) to finish.

python wait_jobs.py FILE [--timeout S]: polls the local backend's admin API (the
backend at SYNAPSE_HOST, admin token SYNAPSE_BACKEND_ADMIN_TOKEN), prints the jobs by
status, wall time, throughput and p50/p99 latency, and exits 1 unless all succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from local_backend import DEFAULT_ADMIN_TOKEN
from local_backend.client import AdminClient

FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    with open(args.file) as f:
        ids = [json.loads(line)["job_id"] for line in f if line.strip()]
    if not ids:
        print("no jobs were submitted", file=sys.stderr)
        return 1
    backend = os.environ.get("SYNAPSE_PLUGIN_RUN_HOST") or os.environ["SYNAPSE_HOST"]
    token = os.environ.get("SYNAPSE_BACKEND_ADMIN_TOKEN") or DEFAULT_ADMIN_TOKEN
    started = time.monotonic()
    jobs: dict[str, dict] = {}
    with AdminClient(backend, token) as admin:
        while True:
            for job_id in ids:
                if jobs.get(job_id, {}).get("status") not in FINAL:
                    jobs[job_id] = admin.job(job_id)
            done = sum(j["status"] in FINAL for j in jobs.values())
            print(f"\r{done}/{len(ids)} jobs finished", end="", flush=True)
            if done == len(ids) or time.monotonic() - started > args.timeout:
                break
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    print()
    by_status: dict[str, int] = {}
    for job in jobs.values():
        by_status[job["status"]] = by_status.get(job["status"], 0) + 1
    latencies = [
        j["metrics_record"]["total_s"]
        for j in jobs.values()
        if j["status"] == "SUCCEEDED" and (j.get("metrics_record") or {}).get("total_s")
    ]
    records = [j.get("metrics_record") or {} for j in jobs.values()]
    first = min((r["submitted_at"] for r in records if r.get("submitted_at")), default=None)
    last = max((r["finished_at"] for r in records if r.get("finished_at")), default=None)
    print("jobs by status:", ", ".join(f"{k}={v}" for k, v in sorted(by_status.items())))
    if first is not None and last is not None and last > first:
        rate = len(ids) / (last - first)
        print(f"first submit to last write {last - first:.1f}s: {rate:.1f} jobs/s")
    print(f"waited {elapsed:.1f}s after the last submit")
    if latencies:
        p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
        print(f"latency submit->final write: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    return 0 if by_status.get("SUCCEEDED", 0) == len(ids) else 1


if __name__ == "__main__":
    sys.exit(main())
