"""scripts/bootstrap on a failing install: a few lines, the log's tail, the log's path.

A copy of the script runs in a scratch project whose one dependency does not exist, so
pip fails after creating the virtual environment and upgrading itself (from the
configured index, as on a first run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

MISSING = "synapse-no-such-package-4d1c"


def test_a_failed_install_prints_its_log_tail_and_where_the_log_is(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap", tmp_path / "scripts" / "bootstrap")
    (tmp_path / "pyproject.toml").write_text(
        "[project]\n"
        'name = "bootstrap-probe"\n'
        'version = "0"\n'
        f'dependencies = ["{MISSING}==1.0"]\n'
        "[project.optional-dependencies]\n"
        "dev = []\n"
        "embedded-redis = []\n"
    )
    run = subprocess.run(
        ["bash", "scripts/bootstrap"],
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = tmp_path / ".venv" / "install.log"
    assert run.returncode != 0
    err = run.stderr
    assert f"the whole log: {log}" in err, err
    assert MISSING in log.read_text()  # pip's own words are in the log...
    tail = [line for line in err.splitlines() if line.startswith("  | ")]
    assert tail and any(MISSING in line for line in tail), err  # ...and their end shown
    assert len(err.splitlines()) <= 30, err  # not pages of pip
    assert not list((tmp_path / ".venv").glob(".installed-*"))  # a rerun tries again
