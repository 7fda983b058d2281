"""A Ray node as a child process: ``ray start ... --block`` in its own process group.

Stopped by signalling the group, never with ``ray stop`` (that stops every Ray cluster
on the machine). Used by the two-node bench and the serve image's layer test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def start_node(
    args: list[str],
    log_path: Path,
    ray_tmpdir: Path,
    *,
    ray: str = RAY,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``ray start ARGS --block`` (``ray``: the program, another venv's say).

    Under its own RAY_TMPDIR: ``ray start`` writes the cluster's address to
    ``<temp dir>/ray/ray_current_cluster``, which outlives a killed cluster, and a later
    ``ray.init()`` anywhere on the machine would try to join it.
    """
    return subprocess.Popen(
        [ray, "start", *args, "--block", "--disable-usage-stats"],
        env={**(os.environ if env is None else env), "RAY_TMPDIR": str(ray_tmpdir)},
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the node's process group (its raylet and workers too); SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
