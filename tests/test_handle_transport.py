"""Serve calls through a DeploymentHandle (SYNAPSE_BRIDGE_SERVE_TRANSPORT=handle).

In-process calls go from this test process, a driver of the session's Ray cluster,
with ``SYNAPSE_SERVE_URL`` pointing at nothing: an answer proves the proxy was not
used. The same statuses, errors, deferred tickets and coalesced calls as over HTTP
(tests/test_serve_e2e.py), then a worker process that joins the cluster and runs a
job end to end. Ray's failures are mapped to httpx's as checked with stand-ins for
the handle's response, which a real cluster cannot be made to give on cue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from config import Settings, load_settings
from devtools.redis_server import RedisServer
from serve_runtime import Pending, ServeClient, ServeClientError
from serve_runtime.errors import (
    ServeConnectionError,
    ServeRouteNotFound,
    ServeTimeout,
    ServeTransientError,
)
from serve_runtime.handle_transport import HandleTransport
from tests.conftest import TOKENS, WorkerProcess
from tests.test_worker import new_job, send, wait_final
from worker.app import create_app

ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]]
NOWHERE = "http://127.0.0.1:9"  # no proxy there: every answer came through a handle


def client(**overrides: Any) -> ServeClient:
    return ServeClient(load_settings(serve_transport="handle", serve_url=NOWHERE, **overrides))


def call(c: ServeClient, app: Any, body: Any, *, user: str = "alice", model: int = 12) -> Any:
    return c.infer(app.route_prefix, body, model=model, token=TOKENS[user], tenant="acme")


def test_a_call_through_the_handle_predicts_without_the_proxy(example_app: Any) -> None:
    c = client()
    assert call(c, example_app, {"inputs": ROWS})["predictions"] == ["setosa", "virginica"]
    assert c.receipt.ack_timeout_s == 0  # no proxy, no receipt to wait for


def test_model_affine_routing_through_the_handle(example_app: Any) -> None:
    c = client(routing_mode="model_affine")
    assert call(c, example_app, {"inputs": ROWS}, user="bob")["predictions"] == [
        "setosa",
        "virginica",
    ]


@pytest.mark.parametrize(
    ("user", "model", "body", "status", "code"),
    [
        ("carol", 13, {"inputs": ROWS}, 403, "forbidden"),  # no grant on model 13
        ("alice", 999, {"inputs": ROWS}, 404, "model_not_found"),
        ("alice", 12, {"inputs": [[1, 2]]}, 422, "invalid_input"),
    ],
)
def test_refusals_come_back_as_over_http(
    example_app: Any, user: str, model: int, body: Any, status: int, code: str
) -> None:
    with pytest.raises(ServeClientError) as info:
        call(client(), example_app, body, user=user, model=model)
    assert (info.value.status_code, info.value.code) == (status, code)
    assert TOKENS[user] not in str(info.value)


def test_an_unknown_route_is_route_not_found(example_app: Any) -> None:
    with pytest.raises(ServeRouteNotFound):
        client().infer("/no-such-app", {"inputs": ROWS}, model=12, token=TOKENS["alice"])


def test_a_coalesced_call_through_the_handle_answers_each_item(example_app: Any) -> None:
    answers = client().infer_many(
        example_app.route_prefix,
        [{"inputs": ROWS[:1]}, {"inputs": [[1, 2]]}, {"inputs": ROWS[1:]}],
        model=12,
        tokens=[TOKENS["alice"], TOKENS["alice"], TOKENS["bob"]],
        tenant="acme",
    )
    assert answers[0]["predictions"] == ["setosa"]
    assert isinstance(answers[1], ServeClientError) and answers[1].status_code == 422
    assert answers[2]["predictions"] == ["virginica"]


def test_a_deferred_result_is_followed_through_the_handle(probe_app: Any) -> None:
    c = client()
    first = call(c, probe_app, {"sleep_s": 1.0, "tag": "h"}, model=22)
    assert isinstance(first, Pending)  # deferred past the probe's 0.5 s
    result = c.call_and_wait(
        probe_app.route_prefix,
        {"sleep_s": 1.0, "tag": "h2"},
        model=22,
        token=TOKENS["alice"],
        tenant="acme",
        wait_s=30,
    )
    assert result["echo"]["tag"] == "h2"


class _Response:
    """Stands in for a DeploymentResponse whose ``result`` raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.cancelled = False

    def result(self, timeout_s: float | None = None) -> Any:
        raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, response: _Response) -> None:
        self.response = response

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, *_: Any) -> _Response:
        return self.response


@pytest.mark.parametrize(
    ("error", "raised", "status"),
    [
        (TimeoutError("slow"), ServeTimeout, None),
        (ActorDiedError(), ServeConnectionError, None),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), None, 503),
    ],
)
def test_rays_failures_become_the_clients_transient_errors(
    example_app: Any,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    raised: type[ServeTransientError] | None,
    status: int | None,
) -> None:
    c = client()
    transport = c._http._transport
    assert isinstance(transport, HandleTransport)
    response = _Response(error)
    monkeypatch.setattr(transport, "_handle", lambda app_name: _Handle(response))
    with pytest.raises(raised or ServeTransientError) as info:
        call(c, example_app, {"inputs": ROWS})
    assert info.value.transient
    assert info.value.status_code == status
    assert response.cancelled == isinstance(error, TimeoutError)


def test_a_worker_on_the_cluster_runs_a_job_through_the_handle(
    example_app: Any, worker_env: dict[str, str], admin: Any, tmp_path: Path
) -> None:
    redis_server = RedisServer(workdir=tmp_path / "redis").start()
    env = {
        **worker_env,
        "REDIS_URL": redis_server.url,
        "SYNAPSE_SERVE_URL": NOWHERE,
        "SYNAPSE_BRIDGE_SERVE_TRANSPORT": "handle",
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "SYNAPSE_BRIDGE_METRICS_PORT": "0",
    }
    env.pop("BROKER_URL", None)
    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=4).start()
    try:
        ids = [new_job(admin) for _ in range(3)]
        for job_id in ids:
            send(job_id, app=create_app(Settings(redis_url=redis_server.url)))
        jobs = [wait_final(admin, job_id, timeout=120) for job_id in ids]
    finally:
        worker.stop()
        redis_server.close()
    # Ray's driver replaces the SIGTERM handler: kept, the worker drains and exits 0.
    assert worker.proc.returncode == 0, "the worker did not stop on SIGTERM (a Ray driver too)"
    assert "Warm shutdown" in (tmp_path / "worker.log").read_text()
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 3, jobs
    assert all(j["result"]["predictions"] == ["setosa", "virginica"] for j in jobs)
