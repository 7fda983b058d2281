"""An image's Python layer rebuilt without a Docker engine (issue 14, item 3).

No Docker engine runs here and base images cannot be pulled, so a layer is rebuilt as
its Dockerfile builds it: a build context holding exactly what the Dockerfile copies,
a clean virtual environment, and the Dockerfile's ``pip install``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.test_docker import DOCKERFILES, parse_dockerfile


def build_context(kind: str, dest: Path) -> list[str]:
    """Copy what ``Dockerfile.<kind>`` copies into ``dest`` (each to ``./<name>``, as
    those Dockerfiles do); the sources copied, as the Dockerfile names them."""
    dest.mkdir(parents=True)
    df = parse_dockerfile(DOCKERFILES[kind])
    sources = [src for srcs in df.copies for src in srcs if not src.startswith("/")]
    for src in sources:
        path = ROOT / src
        target = dest / Path(src).name
        if path.is_dir():
            shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, target)
    return sources


def new_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path


def pip_install(venv: Path, *args: str, cwd: Path) -> None:
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    run = subprocess.run(
        [*pip, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def cli_commands(help_text: str) -> set[str]:
    """The command names a click ``--help`` lists."""
    return {
        line.split()[0] for line in help_text.partition("Commands:")[2].splitlines() if line.strip()
    }
