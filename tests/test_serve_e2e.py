"""The serve runtime end to end: real Ray Serve on the CPU, the real local backend."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from config import load_settings
from serve_runtime import Pending, ServeClient, ServeClientError, infer_remote
from serve_runtime.errors import ServeRouteNotFound
from serve_runtime.tokens import AFFINE_TOKEN_HEADER, MODEL_TOKEN_HEADER
from tests.conftest import EXAMPLE_PLUGIN, TOKENS, wait_for

pytestmark = pytest.mark.usefixtures("example_app")

ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0], [5.9, 2.8, 4.3, 1.3]]


def stats(app_name: str) -> dict[str, Any]:
    from ray import serve

    deployment = "ClassifierDeployment" if "classifier" in app_name else "ProbeDeployment"
    handle = serve.get_deployment_handle(deployment, app_name)
    return handle.model_stats.remote().result(timeout_s=30)


def events(session_dir: Path) -> list[dict[str, Any]]:
    path = session_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_infer_remote_predicts(example_app: Any, serve_env: dict[str, str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Route prefix from ./config.yaml (the SDK's third branch), token and host from ctx.env.
    monkeypatch.chdir(EXAMPLE_PLUGIN)

    class Env:
        def __init__(self, values: dict[str, str]) -> None:
            self.values = values

        def get_str(self, name: str) -> str | None:
            return self.values.get(name)

    class Ctx:
        env = Env({"SYNAPSE_HOST": serve_env["SYNAPSE_HOST"],
                   "SYNAPSE_ACCESS_TOKEN": TOKENS["alice"]})

    result = infer_remote({"model": 12, "json": {"inputs": ROWS}, "tenant": "acme"}, Ctx())
    assert result["predictions"] == ["setosa", "virginica", "versicolor"]
    assert len(result["probabilities"]) == 3
    assert all(abs(sum(p) - 1) < 1e-5 for p in result["probabilities"])
