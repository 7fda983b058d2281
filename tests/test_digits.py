"""The PyTorch example plugin (examples/digits) on real Ray Serve, on the CPU.

A small network trained on scikit-learn's bundled digits, served from a model archive
the local backend holds (model 40), reached through the worker as any job is. On a GPU
host the same plugin runs on CUDA (``num_gpus`` in its config.yaml); here it is the CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits

from examples.digits.make_model import train
from examples.digits.model import ModelInputError, to_rows
from serve_runtime import ServeClientError
from serve_runtime.deploy import deploy
from tests.conftest import DIGITS_MODEL, DIGITS_PLUGIN, TOKENS, WorkerProcess
from tests.test_coalesced_e2e import batch_sizes, grown
from tests.test_serve_e2e import client
from tests.test_worker import new_job, send, wait_final

RELEASE = {"code": "digits-torch", "version": "1.0.0"}
KW = {"model": DIGITS_MODEL, "tenant": "acme"}
DIGITS = load_digits()
ROWS = [[float(v) for v in row] for row in DIGITS.data[:40]]
LABELS = [int(t) for t in DIGITS.target[:40]]


@pytest.fixture(scope="module")
def digits_app(ray_serve: None) -> Any:
    return deploy(DIGITS_PLUGIN)


def test_the_trainer_learns_the_digits() -> None:
    net, accuracy = train(seed=1, epochs=20)
    assert accuracy > 0.9
    assert sum(p.numel() for p in net.parameters()) == 64 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize(
    ("inputs", "named"),
    [
        (None, "non-empty list"),
        ([], "non-empty list"),
        ([[1.0] * 63], "inputs[0] must be a list of 64"),
        ([[1.0] * 64, "x"], "inputs[1] must be a list of 64"),
        ([[1.0] * 63 + [True]], "inputs[0] holds something that is not a number"),
    ],
)
def test_bad_inputs_are_named(inputs: Any, named: str) -> None:
    with pytest.raises(ModelInputError, match=named.replace("[", r"\[").replace("]", r"\]")):
        to_rows(inputs)


def test_a_job_through_the_worker_is_answered_by_the_network(
    admin: Any, worker_proc: WorkerProcess, digits_app: Any
) -> None:
    job_id = new_job(admin, model=DIGITS_MODEL, release=RELEASE, body={"inputs": ROWS})
    send(job_id, model=DIGITS_MODEL, release=RELEASE, body={"inputs": ROWS})
    job = wait_final(admin, job_id, timeout=120)
    assert job["status"] == "SUCCEEDED", job
    result = job["result"]
    right = sum(p == t for p, t in zip(result["predictions"], LABELS, strict=True))
    assert right >= 36, f"{right} of 40 digits right"
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert all(abs(sum(p) - 1) < 1e-3 for p in result["probabilities"])


def test_many_calls_are_one_forward_pass(digits_app: Any) -> None:
    c = client()
    bodies = [{"inputs": [row]} for row in ROWS[:24]]
    c.infer(digits_app.route_prefix, bodies[0], token=TOKENS["alice"], **KW)  # loaded
    before = batch_sizes(digits_app)
    answers = c.infer_many(digits_app.route_prefix, bodies, tokens=[TOKENS["alice"]] * 24, **KW)
    assert grown(before, batch_sizes(digits_app)) == {24: 1}
    alone = c.infer(digits_app.route_prefix, bodies[5], token=TOKENS["alice"], **KW)
    assert answers[5]["predictions"] == alone["predictions"]
    assert answers[5]["probabilities"][0] == pytest.approx(alone["probabilities"][0], abs=1e-5)


def test_a_malformed_body_is_a_422_that_names_the_problem(digits_app: Any) -> None:
    c = client()
    with pytest.raises(ServeClientError) as e:
        c.infer(digits_app.route_prefix, {"inputs": [[1.0] * 10]}, token=TOKENS["alice"], **KW)
    assert e.value.status_code == 422
    assert "inputs[0] must be a list of 64 numbers" in str(e.value)
