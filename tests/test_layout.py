"""The product's layering: what the production worker and the serve client import.

The worker image holds ``config``, ``serve_runtime`` and ``worker`` on pyproject's base
dependencies only (no Ray, FastAPI or uvicorn; no ``devtools``, ``local_backend`` or
``examples``). These checks run the imports in a fresh interpreter and look at
``sys.modules`` afterwards, so an import anywhere in the chain shows up.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from worker.cli import main

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("config", "serve_runtime", "worker")
DEV_ONLY = ("devtools", "local_backend", "examples", "bench", "tests")
SERVE_SIDE = ("ray", "fastapi", "starlette", "uvicorn", "numpy")


def imported_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after ``statement`` runs in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return {name.partition(".")[0] for name in json.loads(run.stdout.splitlines()[-1])}


def test_production_worker_imports_no_dev_or_serve_side_module() -> None:
    loaded = imported_after("import worker.app, worker.tasks, worker.cli")
    assert not loaded & {*DEV_ONLY, *SERVE_SIDE}, sorted(loaded & {*DEV_ONLY, *SERVE_SIDE})


@pytest.mark.parametrize("statement", ["import serve_runtime.client", "import serve_runtime"])
def test_serve_client_imports_neither_fastapi_nor_ray(statement: str) -> None:
    loaded = imported_after(statement)
    assert not loaded & {*SERVE_SIDE, *DEV_ONLY}, sorted(loaded & {*SERVE_SIDE, *DEV_ONLY})


def test_product_source_never_names_dev_packages() -> None:
    """No import of devtools or local_backend anywhere in the product, lazy ones included."""
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                    for name in names
                    if name.partition(".")[0] in DEV_ONLY
                ]
    assert not found, "\n".join(found)


def test_product_imports_nothing_inside_a_function() -> None:
    """Dependencies at the top of each module, where the layering checks can see them:
    an import inside a function hides a cycle or an optional dependency."""
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for fn in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    found += [
                        f"{path.relative_to(ROOT)}:{node.lineno} in {fn.name}()"
                        for node in ast.walk(fn)
                        if isinstance(node, ast.Import | ast.ImportFrom)
                    ]
    assert not found, "\n".join(found)


def test_dev_commands_join_the_cli_through_entry_points() -> None:
    """Installed with devtools (this checkout), `synapse-bridge` has the dev commands too."""
    ctx = click.Context(main)
    assert {"worker", "intake", "serve", "demo", "submit", "backend"} <= set(
        main.list_commands(ctx)
    )
    assert main.get_command(ctx, "demo").callback.__module__ == "devtools.cli"
    assert main.get_command(ctx, "backend").callback.__module__ == "local_backend.cli"
