"""Render docs/reliability.md from the rows the fault scenarios recorded.

python -m tests.reliability_report [RESULTS.jsonl] [OUT.md]
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from tests.fault_kit import OUT as DEFAULT_IN

ROOT = Path(__file__).resolve().parent.parent

GUARANTEES = """
## What each guarantee rests on

| guarantee | mechanism | setting |
|---|---|---|
| a message survives a worker crash | late acks, reject on worker lost, prefetch 1; Redis redelivers unacked messages after the visibility timeout, which must exceed the soft time limit (enforced inside the job) plus the final write | `SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT` (> soft limit + 3 x `SYNAPSE_BRIDGE_BACKEND_TIMEOUT` + 5 s) |
| a message lost between the broker's pop and the worker's record of it (Redis transport, worker killed) is sent again | `submit` records each job in a ledger before publishing; the worker removes it when the job starts; every worker's housekeeping republishes overdue entries while the queue is empty (LLEN over the priority lists on Redis, a passive declare on AMQP); entries expire after 4 graces | `SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT` (the ledger's grace) |
| one final write per job | the final body goes to a Redis outbox first (`HSETNX`: the first result wins), is delivered under a per-job lock that outlives the write (a total deadline per backend call), after a status check on the backend, then a done-marker is set | `SYNAPSE_BRIDGE_FINAL_MARKER_TTL`, `SYNAPSE_BRIDGE_BACKEND_TIMEOUT` |
| a cancelled job stays cancelled | every write (final, RUNNING, progress) reads the job's status under its lock and only moves it forward; the local backend refuses the rest with 409 | |
| every message ends somewhere | outcomes are values settled in one place: a final write, a retry, a poll, or a reject with requeue when settling fails | `SYNAPSE_BRIDGE_RETRY_MAX` |
| a result is never lost or recomputed because its write failed | the outbox keeps it; the flusher thread of every worker delivers it; a redelivered job finds it and delivers instead of recomputing | `SYNAPSE_BRIDGE_OUTBOX_FLUSH_INTERVAL` |
| a serving outage does not fail jobs | 404 from the proxy, 429/502/503/504, timeouts, connection errors and bare 500s retry with exponential backoff and full jitter, bounded | `SYNAPSE_BRIDGE_RETRY_MAX`, `_RETRY_BASE`, `_RETRY_CAP` |
| a broker restart loses nothing, and the worker goes on at once | Redis AOF (`appendfsync always` in the tests); Celery reconnects; redis-py retries commands over the restart; RabbitMQ: durable queues, persistent messages, and no prefetch reduction after a reconnect (its `basic_qos` from pool threads deadlocked the consumer for 3 minutes; `tests/test_broker_restart.py`) | `REDIS_URL`, `BROKER_URL`, Redis `appendonly yes` |
| nothing vanishes on bad input | JSON-only; undecodable, non-JSON, pickle and unknown-task messages are moved byte for byte to `inference.invalid` with the reason; invalid jobs are FAILED with the validation error; non-transient errors are never retried | `SYNAPSE_BRIDGE_MAX_MESSAGE_BYTES`, `SYNAPSE_BRIDGE_BATCH_MAX_ITEMS` |
| bounded memory under a deep queue | prefetch multiplier 1 (a worker holds only its slots' messages), one pooled HTTP client per process | `SYNAPSE_BRIDGE_WORKER_CONCURRENCY` |
| tokens stay secret | tokens sealed (Fernet) in every message the bridge publishes and in the ledger; inspect/Flower/events show only id, tenant, model; DLQ and invalid queue keep no token; redaction processor on every log line | `SYNAPSE_BRIDGE_SEALING_KEY`, `SYNAPSE_BRIDGE_LOG_FORMAT` |
"""


def render_paths(rows: list[dict]) -> list[str]:
    """The adversarial paths of a job's life (tests/test_adversarial.py and others)."""
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["scenario"]] = row
    if not latest:
        return []
    lines = [
        "",
        "## Adversarial paths",
        "",
        "One row per path that used to lose a job, leave it non-final, compute or write it",
        "twice, overwrite a cancellation or leak a token (issue 11), driven end to end.",
        "*stuck* = left RUNNING; *written twice* and *cancellation overwritten* count",
        "attempts the backend refused (409) too; *tokens found* = occurrences of the jobs'",
        "tokens in Redis (every key), the queues, inspect output and the worker's log.",
        "",
        "| path | fault | jobs | lost | stuck non-final | written twice |"
        " cancellation overwritten | tokens found | run at |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def order(row: dict) -> tuple[int, str]:  # A1, A2, ..., A13: by issue item
        head = row["scenario"].split()[0]
        return (int(head[1:]) if head[1:].isdigit() else 999, row["scenario"])

    for row in sorted(latest.values(), key=order):
        lines.append(
            f"| {row['scenario']} | {row['faults']} | {row['jobs']} | {row['lost']} | "
            f"{row['stuck']} | {row['written_twice']} | {row['cancel_overwritten']} | "
            f"{row['tokens_found']} | {row['at']} |"
        )
    return lines


def render(rows: list[dict]) -> str:
    paths = [r for r in rows if r.get("kind") == "path"]
    rows = [r for r in rows if r.get("kind") != "path"]
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["scenario"]] = row
    lines = [
        "# Reliability: faults injected, jobs counted",
        "",
        "Generated by `python -m tests.reliability_report` from the rows the scenario tests",
        "(`tests/test_faults.py`, `tests/test_bad_input.py`, `tests/test_security.py`,",
        "`tests/test_adversarial.py`, `tests/test_tokens_at_rest.py`, `tests/test_admission.py`)",
        "recorded in a real run: `scripts/reliability` reruns them and rewrites this page.",
        f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}.",
        "",
        "Counts come from the local backend's write log: *lost* = never reached a final",
        "status; *written twice* = more than one final write (SUCCEEDED/FAILED) for one job.",
        "",
        "| scenario | load | faults injected | submitted | succeeded | failed | lost |"
        " written twice | time (s) | run at |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in latest.values():
        lines.append(
            f"| {row['scenario']} | {row['load']} | {row['faults']} | {row['submitted']} | "
            f"{row['succeeded']} | {row['failed']} | {row['lost']} | {row['written_twice']} | "
            f"{row['elapsed_s']} | {row['at']} |"
        )
    extras = [r for r in latest.values() if any(k.startswith("worker_rss") for k in r)]
    for row in extras:
        lines += [
            "",
            f"{row['scenario']}: worker RSS after warm-up "
            f"{row['worker_rss_after_warmup_mb']} MB, peak {row['worker_rss_peak_mb']} MB, "
            f"final {row['worker_rss_final_mb']} MB.",
        ]
    for row in latest.values():
        if row.get("serve_calls"):
            lines += [
                "",
                f"{row['scenario']}: coalescing on; the worker's jobs went to Serve in "
                f"{row['serve_calls']:.0f} calls carrying {row['jobs_in_calls']:.0f} jobs "
                f"({row['jobs_in_calls'] / row['serve_calls']:.2f} per call)"
                + (", read just before the kill" if "killed" in row["scenario"] else "")
                + ".",
            ]
    notes = [r for r in latest.values() if r.get("note")]
    for row in notes:
        lines += ["", f"{row['scenario']}: {row['note']}"]
    lines += ["", "Per scenario, what it rests on:", ""]
    for row in latest.values():
        lines.append(f"- **{row['scenario']}**: {row['rests_on']}")
    lines += render_paths(paths)
    return "\n".join(lines) + "\n" + GUARANTEES


def main(argv: list[str]) -> None:
    src = Path(argv[0]) if argv else DEFAULT_IN
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "reliability.md"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows))
    print(f"wrote {out} from {len(rows)} rows of {src}")


if __name__ == "__main__":
    main(sys.argv[1:])
