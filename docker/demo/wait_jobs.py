"""Wait for the jobs `synapse-bridge submit` created (its JSON lines in FILE) to finish.

python wait_jobs.py FILE [--timeout S]: polls the local backend's admin API (the
backend at SYNAPSE_HOST, admin token SYNAPSE_BACKEND_ADMIN_TOKEN), prints the jobs by
status, how long processing took, the workers that ran them and p50 times, and
exits 1 unless all succeeded.
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
    shown = -1
    tty = sys.stdout.isatty()
    with AdminClient(backend, token) as admin:
        while True:
            for job_id in ids:
                if jobs.get(job_id, {}).get("status") not in FINAL:
                    jobs[job_id] = admin.job(job_id)
            done = sum(j["status"] in FINAL for j in jobs.values())
            if done != shown:
                print(f"{done}/{len(ids)} jobs finished", end="\r" if tty else "\n", flush=True)
                shown = done
            if done == len(ids) or time.monotonic() - started > args.timeout:
                break
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    if tty:
        print()
    by_status: dict[str, int] = {}
    for job in jobs.values():
        by_status[job["status"]] = by_status.get(job["status"], 0) + 1
    records = [j.get("metrics_record") or {} for j in jobs.values()]
    print("jobs by status:", ", ".join(f"{k}={v}" for k, v in sorted(by_status.items())))
    starts = [r["started_at"] for r in records if r.get("started_at")]
    ends = [r["finished_at"] for r in records if r.get("finished_at")]
    submits = [r["submitted_at"] for r in records if r.get("submitted_at")]
    workers = {r["worker"] for r in records if r.get("worker")}
    if submits:
        # One `synapse-bridge submit` process per job: submitting is the slow part here.
        print(f"submitted over {max(submits) - min(submits):.1f}s, one process per job")
    if starts and ends and max(ends) > min(starts):
        window = max(ends) - min(starts)
        rate = len(records) / window
        print(f"processed in {window:.1f}s ({rate:.1f} jobs/s) by {len(workers)} worker(s)")

    def p50_ms(key: str) -> str:
        values = [r[key] for r in records if r.get(key) is not None]
        return f"{percentile(values, 50) * 1000:.0f} ms" if values else "-"

    service = [r["finished_at"] - r["started_at"] for r in records if r.get("started_at")]
    if service:
        print(
            f"p50: queue wait {p50_ms('queue_wait_s')}, inference {p50_ms('inference_s')}, "
            f"service {percentile(service, 50) * 1000:.0f} ms, "
            f"submit to final write {p50_ms('total_s')}"
        )
    print(f"waited {elapsed:.1f}s after the last submit")
    return 0 if by_status.get("SUCCEEDED", 0) == len(ids) else 1


if __name__ == "__main__":
    sys.exit(main())
