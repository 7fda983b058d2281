"""A smoke check of the benchmark harness: it runs and writes what it should.

``python -m bench run`` with tiny sizes in its own process (its own local Ray
cluster, backend and Redis servers on free ports, so it never meets this session's),
into a temporary results folder. Nothing here is timed: the assertions are about the
files, the systems and that numbers are there, never about how fast.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # The bench starts its own stack with its own settings: nothing the other tests of
    # this session put in the environment (their Ray, their Redis, SYNAPSE_* such as
    # RUNNING marks at once) may leak into it.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "REDIS_URL") and not k.startswith("SYNAPSE_")
    }
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.timeout(1200)
def test_bench_quick_w1_and_w4(tmp_path: Path) -> None:
    results = tmp_path / "results"
    for args in (["--workload", "W1", "--jobs", "40"], ["--workload", "W4", "--jobs", "10"]):
        out = _run(["run", "--quick", *args, "--results-dir", str(results)])
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    w1 = json.loads((results / "W1.json").read_text())
    assert "error" not in w1, w1.get("traceback")
    assert w1["quick"] is True and w1["jobs"] == 40
    assert [s["system"] for s in w1["systems"]] == ["direct", "peer", "bridge"]
    for s in w1["systems"]:
        assert s["succeeded"] == 40 and s["failed"] == 0
        assert _number(s["throughput"]) and s["throughput"] > 0
        assert _number(s["latency_ms"]["p50"]) and _number(s["latency_ms"]["p99"])
    assert w1["targets"] and all("met" in t for t in w1["targets"])
    peer, bridge = w1["systems"][1:]
    assert peer["lost"] == 0 and peer["backend_patches_per_job"] == 2.0  # RUNNING + final
    # The final write; RUNNING only for a job still running after 1 s (few or none here).
    assert bridge["lost"] == 0 and 1.0 <= bridge["backend_patches_per_job"] < 1.5

    w4 = json.loads((results / "W4.json").read_text())
    assert "error" not in w4, w4.get("traceback")
    assert [s["system"] for s in w4["systems"]] == ["direct", "peer", "bridge"]
    bridge = w4["systems"][2]
    assert len(bridge["sequential"]) == 10
    assert _number(bridge["overhead_ms"]["p50"]) and _number(bridge["overhead_ms"]["p99"])

    report = (results / "REPORT.md").read_text()
    assert "QUICK RUN" in report
    for needle in ("## W1 overhead", "## W4 latency", "| direct |", "| peer |", "| bridge |"):
        assert needle in report
    assert "nproc" in report and "ray" in report
    plots = {p.name for p in (results / "plots").glob("*.png")}
    assert {"W1-throughput.png", "W1-latency.png", "W4-latency.png"} <= plots

    # `report` alone regenerates from the result files present.
    (results / "REPORT.md").unlink()
    out = _run(["report", "--results-dir", str(results)], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "## W1 overhead" in (results / "REPORT.md").read_text()
