"""Deferred tickets on real Serve replicas, and the worker when a ticket is lost.

Issue 12, item 2 (tickets answerable wherever the poll lands, kept from completion,
resubmission bounded and counted) and item 8's third point (a poll is authorized
like inference and answers only the caller who made the ticket).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis

from config import load_settings
from local_backend.server import free_port
from serve_runtime import Pending, ServeClient, ServeClientError
from serve_runtime.deferred import POLL_KEY
from serve_runtime.errors import DeferredNotFound
from serve_runtime.tokens import MODEL_TOKEN_HEADER
from tests.conftest import PROBE_PLUGIN, TOKENS, WorkerProcess, wait_for
from tests.test_serve_e2e import events
from worker.ledger import Ledger
from worker.message import parse_job

PROBE_DEPLOYMENT = "ProbeDeployment"


def client() -> ServeClient:
    return ServeClient(load_settings())


def computed(session_dir: Path, count: str) -> int:
    """How often the probe ran the request counted ``count``."""
    return sum(1 for e in events(session_dir) if e["event"] == "infer" and e["count"] == count)


def each_replica(app_name: str, method: str, replicas: int = 2) -> dict[int, dict[str, Any]]:
    """``method``'s answer from every replica (handle calls land on either), by pid."""
    from ray import serve

    handle = serve.get_deployment_handle(PROBE_DEPLOYMENT, app_name)
    seen: dict[int, dict[str, Any]] = {}

    def all_seen() -> bool:
        out = getattr(handle, method).remote().result(timeout_s=30)
        seen[out["pid"]] = out
        return len(seen) >= replicas

    wait_for(all_seen, timeout=60, interval=0, what=f"{method} from {replicas} replicas")
    return seen


def spread_models(app: Any, c: ServeClient, bound: int = 2) -> None:
    """Both replicas at their model bound. The multiplexing header of a compatible-mode
    call is the caller's JWT, which no replica lists as loaded, so Ray routes it to the
    replicas with the fewest models: equal counts, and polls land on both."""
    models = [21, 22, 23]
    for i in range(12):
        per_replica = each_replica(app.app_name, "model_stats")
        if all(len(s["resident"]) >= bound for s in per_replica.values()):
            return
        model = models[i % len(models)]
        c.infer(app.route_prefix, {"x": 1}, model=model, token=TOKENS["alice"], tenant="acme")
    raise AssertionError(f"the replicas did not reach {bound} models each: {per_replica}")


def poll(c: ServeClient, app: Any, ticket: str, *, user: str = "alice", model: int = 21) -> Any:
    return c.poll(app.route_prefix, ticket, model=model, token=TOKENS[user], tenant="acme")


# --- (a) two replicas: every poll finds the ticket, the work runs once


def test_polls_landing_on_either_replica_find_the_ticket(
    probe_pair_app: Any, session_dir: Path
) -> None:
    c = client()
    spread_models(probe_pair_app, c)
    run = uuid.uuid4().hex[:8]
    counts = [f"pair-{run}-{i}" for i in range(6)]
    pendings: dict[str, Any] = {}

    def defer(count: str) -> None:
        body = {"sleep_s": 2, "count": count}
        pendings[count] = c.infer(
            probe_pair_app.route_prefix, body, model=21, token=TOKENS["alice"], tenant="acme"
        )

    threads = [threading.Thread(target=defer, args=(n,)) for n in counts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(pendings.get(n), Pending) for n in counts), pendings

    answers: dict[str, int] = {"pending": 0, "result": 0}
    results: dict[str, Any] = {}

    def poll_all() -> bool:
        for count in counts:
            try:
                out = poll(c, probe_pair_app, pendings[count].ticket)
            except DeferredNotFound:
                raise AssertionError(f"a poll of {count} answered not_found: {answers}") from None
            if isinstance(out, Pending):
                answers["pending"] += 1
            else:
                answers["result"] += 1
                assert out["echo"]["count"] == count
                results[count] = out
        return len(results) == len(counts)

    # While the work runs, then until every result is in: never not_found.
    wait_for(poll_all, timeout=60, interval=0.05, what="every result")
    # Then until both replicas have answered polls, one at least from the store.
    before = each_replica(probe_pair_app.app_name, "deferred_stats")

    def both_answered() -> bool:
        poll_all()
        after = each_replica(probe_pair_app.app_name, "deferred_stats")
        delta = {
            pid: {k: s[k] - before.get(pid, {}).get(k, 0) for k in ("polls_here", "polls_shared")}
            for pid, s in after.items()
        }
        here_or_shared = [d["polls_here"] + d["polls_shared"] for d in delta.values()]
        return all(n > 0 for n in here_or_shared) and any(d["polls_shared"] for d in delta.values())

    wait_for(both_answered, timeout=90, interval=0.05, what="polls answered by both replicas")
    assert answers["pending"] > 0 and answers["result"] >= len(counts)
    for count in counts:  # computed once, however many polls and wherever they landed
        assert computed(session_dir, count) == 1, count


# --- (c) a ticket answers only its caller; polls are authorized like inference


def test_a_ticket_answers_only_the_caller_who_made_it(probe_app: Any) -> None:
    c = client()
    count = f"owner-{uuid.uuid4().hex[:8]}"
    pending = c.infer(
        probe_app.route_prefix,
        {"sleep_s": 1, "count": count},
        model=12,
        token=TOKENS["alice"],
        tenant="acme",
    )
    assert isinstance(pending, Pending)
    ticket = pending.ticket

    def result() -> Any:
        out = poll(c, probe_app, ticket, model=12)
        return None if isinstance(out, Pending) else out

    assert wait_for(result, timeout=30, interval=0.05, what="alice's result")["echo"]["count"]

    # bob may use model 12 too: his polls learn nothing (the replica that made the
    # ticket answers them: one replica, so what is tested is whom a ticket answers).
    for _ in range(3):
        with pytest.raises(DeferredNotFound):
            poll(c, probe_app, ticket, user="bob", model=12)
    # alice's own token, for another model she may use: not the caller either.
    with pytest.raises(DeferredNotFound):
        poll(c, probe_app, ticket, model=13)
    # eve (globex) asking for acme's model: refused as inference is.
    with pytest.raises(ServeClientError) as refused:
        poll(c, probe_app, ticket, user="eve", model=12)
    assert refused.value.status_code == 403

    url = f"{load_settings().serve_url}{probe_app.route_prefix}/"
    no_token = httpx.post(url, json={POLL_KEY: ticket}, timeout=30)
    assert no_token.status_code == 400, no_token.text
    claims = {"model": "12", "token": TOKENS["alice"], "tenant": "acme"}
    forged = jwt.encode(claims, "not-the-deployment-signing-key-32b")
    bad = httpx.post(url, json={POLL_KEY: ticket}, headers={MODEL_TOKEN_HEADER: forged}, timeout=30)
    assert bad.status_code == 401, bad.text
    for response in (no_token, bad):
        assert count not in response.text

    assert poll(c, probe_app, ticket, model=12)["echo"]["count"] == count  # still alice's


# --- (d) the worker: a ticket lost every time is resubmitted at most the bound


@pytest.fixture
def short_keep_app(ray_serve: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The probe keeping results 0.3 s: shorter than the worker's poll interval below,
    so every result is gone before its first poll."""
    from ray import serve

    from serve_runtime.deploy import deploy

    monkeypatch.setenv("SYNAPSE_BRIDGE_DEFERRED_KEEP", "0.3")  # what the replicas read
    spec = deploy(PROBE_PLUGIN, app_name="probe-shortkeep", route_prefix="/probeshortkeep")
    monkeypatch.delenv("SYNAPSE_BRIDGE_DEFERRED_KEEP")
    yield spec
    serve.delete(spec.app_name)


def metric(port: int, name: str) -> dict[str, float]:
    """The samples of one counter, by label set, from the worker's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_a_lost_ticket_is_resubmitted_at_most_the_bound_then_failed(
    short_keep_app: Any,
    admin: Any,
    worker_env: dict[str, str],
    redis_url: str,
    session_dir: Path,
) -> None:
    from worker.app import create_app  # the Celery app: imported where used, as test_worker
    from worker.submit import send_message

    bound = 2
    url = redis_url.rsplit("/", 1)[0] + "/5"  # a broker of its own: no other worker polls
    port = free_port("127.0.0.1")
    env = {
        **worker_env,
        "REDIS_URL": url,
        "SYNAPSE_BRIDGE_DEFERRED_POLL_INTERVAL": "4",  # well past completion + keep
        "SYNAPSE_BRIDGE_DEFERRED_RESUBMITS": str(bound),
        "SYNAPSE_BRIDGE_METRICS_PORT": str(port),
    }
    proc = WorkerProcess(env, session_dir / "worker-tickets.log").start()
    try:
        count = f"lost-{uuid.uuid4().hex[:8]}"
        body = {"sleep_s": 1, "count": count}
        release = {"checksum": "probeshortkeep"}
        job_id = uuid.uuid4().hex
        admin.create_job(
            id=job_id, tenant="acme", plugin_release=release, params={"model": 22, "json": body}
        )
        msg = parse_job(
            {
                "job_id": job_id,
                "tenant": "acme",
                "token": TOKENS["alice"],
                "model": 22,
                "json": body,
                "release": release,
            }
        )
        ledger = Ledger(redis.Redis.from_url(url), grace_s=3600)
        send_message(msg, app=create_app(load_settings(redis_url=url)), ledger=ledger)

        job = wait_for(
            lambda: (j := admin.job(job_id))["status"] in ("SUCCEEDED", "FAILED") and j,
            timeout=120,
            interval=0.2,
            what="the job final",
        )
        assert job["status"] == "FAILED", job
        error = job["result"]["error"]
        assert f"SYNAPSE_BRIDGE_DEFERRED_RESUBMITS={bound}" in error
        assert f"lost {bound + 1} times" in error
        assert computed(session_dir, count) == bound + 1  # the first run and the bound
        lost = metric(port, "synapse_deferred_tickets_lost_total")
        assert lost == {'{action="resubmitted"}': bound, '{action="failed"}': 1.0}, lost
    finally:
        proc.stop()
