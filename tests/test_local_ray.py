"""Without RAY_ADDRESS, ``ensure_ray`` starts its own local Ray, whatever else is there.

Ray's ``ray.init()`` with no address connects to the cluster named in
``<ray temp dir>/ray_current_cluster``, the file every ``ray start`` writes and no
kill removes. A cluster started by hand, by ``bench/two_nodes.py``, or one long dead
left that file behind, and the test session's ``ensure_ray(num_cpus=4)`` failed with
"When connecting to an existing cluster, num_cpus and num_gpus must not be provided"
(CI: 118 tests errored at the ``ray_serve`` fixture). Each case runs in its own
process with its own RAY_TMPDIR, so this session's cluster is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import ray
from serve_runtime.deploy import ensure_ray
ensure_ray(num_cpus=1)
print("CPU", ray.cluster_resources().get("CPU"))
print("GCS", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    # Short: Ray's socket paths under it must stay below the 107-byte limit.
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _ensure_ray_in(ray_tmpdir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_stale_ray_current_cluster_file_is_not_joined(ray_tmpdir: Path) -> None:
    # What `ray start --head` leaves behind once its cluster is gone.
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")

    out = _ensure_ray_in(ray_tmpdir)

    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert float(lines["CPU"]) == 1.0, out.stdout
    assert lines["GCS"] != "127.0.0.1:1"
