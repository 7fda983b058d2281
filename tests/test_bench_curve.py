"""W6's parts that need no cluster: the open-loop sender's schedule, the plan from the
command line, and the report's table and plot from a result file.

W6 itself starts five systems (the peer's Serve application among them): too long for
the smoke test, so its run is left to ``python -m bench run --workload W6 --quick``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.producer import send_at_rate
from bench.report import write_report
from bench.workloads import CURVE_FULL, CURVE_QUICK, curve_plan


def test_open_loop_never_sends_ahead_of_its_schedule() -> None:
    sent: list[tuple[float, str]] = []
    jobs = [{"id": f"j{i}"} for i in range(20)]
    start = time.monotonic()
    out = send_at_rate(lambda job: sent.append((time.monotonic(), job["id"])), jobs, 200.0)
    assert [j for _, j in sent] == [j["id"] for j in jobs]  # all, in order
    for i, (t, _) in enumerate(sent):
        assert t >= start + i / 200.0 - 1e-3  # job i not before start + i/rate
    assert out["sent"] == 20 and out["rate"] == 200.0 and out["lag_max_s"] >= 0


def test_a_slow_send_does_not_slow_the_schedule_down() -> None:
    """Open loop: a sender behind schedule sends the next jobs at once (and says so)."""
    sent: list[float] = []

    def slow(job: dict[str, Any]) -> None:
        sent.append(time.monotonic())
        if job["id"] == "j0":
            time.sleep(0.1)  # 10 intervals at 100/s

    out = send_at_rate(slow, [{"id": f"j{i}"} for i in range(5)], 100.0)
    assert out["lag_max_s"] > 0.05
    assert sent[4] - sent[1] < 0.03  # j1..j4 were all due: no pacing between them


def test_curve_plan_from_the_command_line() -> None:
    assert curve_plan(False) == CURVE_FULL and curve_plan(True) == CURVE_QUICK
    plan = curve_plan(True, "20,60", 2.0)
    assert plan.rates == (20.0, 60.0) and plan.duration_s == 2.0
    assert plan.jobs == 40 + 120
    assert CURVE_QUICK.jobs < CURVE_FULL.jobs  # a quick run is flagged QUICK


def _point(rate: float, items_s: float, p50: float, p99: float) -> dict[str, Any]:
    return {
        "rate": rate,
        "sent_rate": rate,
        "jobs": 10,
        "succeeded": 10,
        "failed": 0,
        "lost": 0,
        "throughput": items_s,
        "latency_ms": {"p50": p50, "p99": p99},
        "mean_batch": 3.0,
        "accel": {"utilization": 0.5},
        "machine_busy": 0.4,
    }


def test_report_has_the_w6_table_and_curve(tmp_path: Path) -> None:
    systems = [
        {
            "system": kind,
            "label": label,
            "points": [_point(25, 24.0, 80.0, 120.0), _point(150, 140.0, 200.0, 900.0)],
        }
        for kind, label in (("peer", "peer"), ("bridge", "bridge (wait 10 ms)"))
    ]
    result = {
        "workload": "W6",
        "title": "throughput against latency",
        "quick": True,
        "jobs": 20,
        "full_jobs": CURVE_FULL.jobs,
        "ceiling": 281.0,
        "systems": systems,
        "targets": [],
        "generated_at": "2026-12-06T03:04:47+0000",
        "machine": {"nproc": 2, "cpu_model": "Intel(R) Xeon(R) Processor", "mem_total_gib": 23.5},
    }
    (tmp_path / "W6.json").write_text(json.dumps(result))
    report = write_report(tmp_path, tmp_path).read_text()
    assert "## W6 throughput against latency" in report
    assert "| bridge (wait 10 ms) | 150 |" in report and "| peer | 25 |" in report
    assert "![W6-curve.png](plots/W6-curve.png)" in report
    # each workload's run names the CPU it ran on: the pool's machines differ
    assert "| W6 | 2026-12-06T03:04:47+0000 | 2 | Intel(R) Xeon(R) Processor | 23.5 GiB |" in report
    assert (tmp_path / "plots" / "W6-curve.png").stat().st_size > 0
