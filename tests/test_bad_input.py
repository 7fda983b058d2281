"""R5, bad input: every case of the corpus gets the right outcome, once, with a clear error.

The corpus lives in ``tests/data/bad_inputs`` (one JSON file per case, written by its
``make_corpus.py``): malformed, truncated and mistyped messages, missing fields, huge
bodies, non-UTF-8, pickle/YAML/msgpack bodies, unknown tasks, messages without task
headers, unknown models, a model with no file, hostile archives (zip-slip, ``..``,
absolute paths, escaping links, devices, a corrupt and a non-archive, two decompression
bombs over the replicas' 8 GiB bound, a checksum mismatch), endpoints answering invalid
JSON, a bad envelope or a bare 500, forbidden and unknown tokens.

All cases run, one after the other, through ONE worker process on its own throwaway
Redis, against the session's real backend and Ray Serve; a good job goes through after
every 10 cases and must succeed (the worker keeps serving). A case's outcome:

* ``quarantined``: the message is on ``inference.invalid`` with its reason (the
  ``x-synapse-invalid-reason`` header, or the header of a ``synapse.inference.invalid``
  task), and its job, when it can be read, is FAILED with that error, never RUNNING,
  written once;
* ``failed``: the job is FAILED with the expected error, one final write, and, unless
  the case is transient by policy (a bare 500, an unknown route), one RUNNING write at
  most: it was attempted once.

One row goes to the reliability table (``fault_kit.record``).
"""

from __future__ import annotations

import ast
import base64
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TOKENS, WorkerProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CORPUS = ROOT / "tests" / "data" / "bad_inputs"
CASE_FILES = sorted((CORPUS / "cases").glob("*.json"))
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
GOOD_EVERY = 10
CLASSIFIER = {"code": "example-classifier", "version": "1.0.0"}
ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]]
REASON_HEADER = "x-synapse-invalid-reason"
INVALID_TASK = "synapse.inference.invalid"

# The module's worker: small limits so the huge and too-many cases stay small, few and
# quick retries so the transient cases end soon.
WORKER_OVERRIDES = {
    "SYNAPSE_BRIDGE_MAX_MESSAGE_BYTES": "262144",
    "SYNAPSE_BRIDGE_BATCH_MAX_ITEMS": "50",
    "SYNAPSE_BRIDGE_RETRY_MAX": "2",
    "SYNAPSE_BRIDGE_RETRY_BASE": "0.2",
    "SYNAPSE_BRIDGE_RETRY_CAP": "0.5",
    "SYNAPSE_BRIDGE_METRICS_PORT": "0",
    "SYNAPSE_BRIDGE_LOG_FORMAT": "json",
    "SYNAPSE_BRIDGE_LOG_LEVEL": "INFO",
}


def load_cases() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in CASE_FILES]


def test_corpus_is_complete_and_current(tmp_path: Path) -> None:
    """At least 50 cases, every kind the issue names, and the generator reproduces it."""
    cases = load_cases()
    assert len(cases) >= 50
    assert {c["kind"] for c in cases} == {"message", "raw", "model", "endpoint"}
    assert [c["id"] for c in cases] == [p.stem for p in CASE_FILES]
    for c in cases:
        assert c["expect"]["outcome"] in ("quarantined", "failed"), c["id"]
        if c["kind"] == "raw":
            assert (CORPUS / c["raw"]["body_file"]).is_file(), c["id"]
        if c["kind"] == "model" and "archive" in c["model"]:
            assert (CORPUS / c["model"]["archive"]).is_file(), c["id"]
    assert (CORPUS / "archives" / "bomb.zip").stat().st_size < 200_000
    # Regenerate into a copy: the committed files are what the generator writes.
    copy = tmp_path / "bad_inputs"
    shutil.copytree(CORPUS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    import runpy

    runpy.run_path(str(copy / "make_corpus.py"), run_name="__main__")
    for sub in ("cases", "bodies", "archives"):
        mine = {p.name: p.read_bytes() for p in (CORPUS / sub).iterdir()}
        fresh = {p.name: p.read_bytes() for p in (copy / sub).iterdir()}
        assert mine.keys() == fresh.keys(), sub
        stale = [name for name in mine if mine[name] != fresh[name]]
        assert not stale, f"{sub}: rerun make_corpus.py ({stale})"


# --------------------------------------------------------------------------- the worker


@dataclass
class Rig:
    worker: WorkerProcess
    redis_url: str
    producer: Any
    marker: Path

    @property
    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)


@pytest.fixture(scope="module")
def rig(worker_env: dict[str, str], example_app: Any, probe_app: Any, session_dir: Path) -> Any:
    from devtools.redis_server import RedisServer
    from tests.fault_kit import Producer
    from tests.test_security import close_producer

    server = RedisServer().start()
    env = {**worker_env, **WORKER_OVERRIDES, "REDIS_URL": server.url, "BROKER_URL": server.url}
    worker = WorkerProcess(env, session_dir / "worker-bad-input.log", concurrency=4).start()
    producer = Producer(server.url, server.url)
    try:
        yield Rig(worker, server.url, producer, session_dir / "bad-input-pickle-ran")
    finally:
        close_producer(producer)
        worker.stop()
        server.close()


# --------------------------------------------------------------------------- filling in


def fill(value: Any, subst: dict[str, Any]) -> Any:
    """Replace placeholders (``$JOB_ID``, ``$TOKEN:user``, ``$MODEL``) in a JSON value."""
    if isinstance(value, str):
        if value in subst:
            return subst[value]
        for k, v in subst.items():
            if isinstance(v, str):
                value = value.replace(k, v)
        return value
    if isinstance(value, list):
        return [fill(v, subst) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, subst) for k, v in value.items()}
    return value


def substitutions(job_id: str, marker: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"$JOB_ID": job_id, "$MARKER": str(marker)}
    out.update({f"$TOKEN:{user}": token for user, token in TOKENS.items()})
    return out


def seed_case_models(admin: Any, cases: list[dict[str, Any]], tmp: Path) -> None:
    """Give each archive case its model: the corpus file, stored as the backend sees it."""
    models = []
    for c in cases:
        spec = c.get("model") or {}
        if "archive" not in spec:
            continue
        src = CORPUS / spec["archive"]
        dest = tmp / f"model-{spec['id']}.{spec['seed_ext']}"
        shutil.copyfile(src, dest)
        model = {
            "id": spec["id"],
            "name": f"bad-input-{c['id']}",
            "tenant": "acme",
            "version": 1,
            "archive": str(dest),
        }
        if "checksum" in spec:
            model["checksum"] = spec["checksum"]
        models.append(model)
    admin.seed({"models": models})


# --------------------------------------------------------------------------- the queue


def invalid_lists(r: Any) -> dict[str, int]:
    """Lengths of ``inference.invalid`` and its priority sub-lists."""
    return {k.decode(): r.llen(k) for k in r.keys("inference.invalid*") if r.type(k) == b"list"}


def new_quarantined(r: Any, before: dict[str, int]) -> list[dict[str, Any]]:
    """Messages pushed onto the invalid lists since ``before`` (LPUSH: newest first)."""
    out = []
    for key, n in invalid_lists(r).items():
        added = n - before.get(key, 0)
        if added > 0:
            out += [json.loads(m) for m in r.lrange(key, 0, added - 1)]
    return out


def reason_of(envelope: dict[str, Any]) -> str | None:
    """The reason a quarantined message carries, read from its headers only."""
    headers = envelope.get("headers") or {}
    if REASON_HEADER in headers:
        return str(headers[REASON_HEADER])
    if headers.get("task") == INVALID_TASK:
        try:
            return str(ast.literal_eval(headers.get("kwargsrepr") or "{}").get("error"))
        except (ValueError, SyntaxError):
            return str(headers.get("kwargsrepr"))
    return None


def body_of(envelope: dict[str, Any]) -> bytes:
    body = envelope.get("body") or ""
    if (envelope.get("properties") or {}).get("body_encoding") == "base64":
        return base64.b64decode(body)
    return body.encode() if isinstance(body, str) else body


# --------------------------------------------------------------------------- one case


@dataclass
class Outcome:
    case: str
    kind: str
    ok: bool = False
    detail: str = ""
    job_id: str | None = None
    final_writes: int = 0
    running_writes: int = 0
    reason: str | None = None


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    good: list[str] = field(default_factory=list)
    good_ok: int = 0


def send_case(rig: Rig, case: dict[str, Any], subst: dict[str, Any]) -> None:
    from worker.message import TASK_NAME, safe_kwargsrepr

    if case["kind"] == "raw":
        spec = case["raw"]
        body = (CORPUS / spec["body_file"]).read_bytes()
        for k, v in subst.items():
            if isinstance(v, str):
                body = body.replace(k.encode(), v.encode())
        headers: dict[str, Any] = {"x-bad-input-case": case["id"]}
        if spec["task"] is not None:
            headers.update(
                {
                    "lang": "py",
                    "task": spec["task"],
                    "id": uuid.uuid4().hex,
                    "root_id": None,
                    "parent_id": None,
                    "argsrepr": "()",
                    "kwargsrepr": "{...}",
                    "origin": "bad-input-corpus",
                }
            )
        rig.producer.send_raw(
            body,
            content_type=spec["content_type"],
            content_encoding=spec["content_encoding"],
            headers=headers,
        )
        return
    message = fill(case["message"], subst)
    kwargs = message["kwargs"]
    if case.get("pad_bytes"):
        kwargs["job"]["json"]["pad"] = "x" * int(case["pad_bytes"])
    rig.producer.app.send_task(
        TASK_NAME,
        args=message["args"],
        kwargs=kwargs,
        kwargsrepr=safe_kwargsrepr(kwargs),
        argsrepr="()",
    )


def job_state(admin: Any, job_id: str) -> tuple[dict[str, Any], int, int]:
    job = admin.job(job_id)
    writes = admin.writes(job_id)
    final = sum(1 for w in writes if w["body"].get("status") in FINAL)
    running = sum(1 for w in writes if w["body"].get("status") == "RUNNING")
    return job, final, running


class WorkerDied(AssertionError):
    """The module's worker exited: the scenario stops there (and says at which case)."""


def wait_serving(rig: Rig, predicate: Any, timeout: float, what: str) -> Any:
    """``wait_for``, but a worker that exits ends the wait at once."""

    def check() -> Any:
        value = predicate()
        if not value and rig.worker.proc.poll() is not None:
            raise WorkerDied(f"the worker exited ({rig.worker.proc.returncode}) awaiting {what}")
        return value

    return wait_for(check, timeout=timeout, interval=0.1, what=what)


def wait_job_final(rig: Rig, admin: Any, job_id: str, timeout: float) -> dict[str, Any]:
    return wait_serving(
        rig,
        lambda: (j := admin.job(job_id))["status"] in FINAL and j,
        timeout,
        f"job {job_id} final",
    )


def error_of(job: dict[str, Any]) -> str:
    result = job.get("result")
    if isinstance(result, dict) and "error" in result:
        return str(result["error"])
    return json.dumps(result)[:500]


def run_case(rig: Rig, admin: Any, case: dict[str, Any]) -> Outcome:
    expect = case["expect"]
    out = Outcome(case["id"], case["kind"])
    job_id = f"bad-{case['id'][:3]}-{uuid.uuid4().hex[:10]}"
    subst = substitutions(job_id, rig.marker)
    if case.get("model"):
        subst["$MODEL"] = case["model"]["id"]
    job_spec = case.get("job") or {}
    if job_spec.get("create"):
        admin.create_job(
            id=job_id,
            tenant=job_spec.get("tenant", "acme"),
            plugin_release=CLASSIFIER,
            params={"case": case["id"]},
        )
        out.job_id = job_id
    r = rig.redis
    before = invalid_lists(r)
    send_case(rig, case, subst)

    if expect["outcome"] == "quarantined":
        try:
            found = wait_serving(
                rig, lambda: new_quarantined(r, before), 90, f"{case['id']} quarantined"
            )
        except WorkerDied:
            raise
        except AssertionError as e:
            out.detail = str(e)
            return out
        reasons = [reason_of(m) for m in found]
        out.reason = "; ".join(str(x) for x in reasons)
        if len(found) != 1:
            out.detail = f"{len(found)} messages quarantined: {out.reason}"
            return out
        if expect["reason"] not in (reasons[0] or ""):
            out.detail = f"reason {reasons[0]!r} lacks {expect['reason']!r}"
            return out
        if case["kind"] == "raw":  # byte for byte, with the case's own headers
            headers = found[0].get("headers") or {}
            if headers.get("x-bad-input-case") != case["id"]:
                out.detail = f"quarantined message is not this case's: {headers}"
                return out
        if expect.get("job_failed"):
            job = wait_job_final(rig, admin, job_id, 60)
            job, out.final_writes, out.running_writes = job_state(admin, job_id)
            if job["status"] != "FAILED" or expect["reason"] not in error_of(job):
                out.detail = f"job {job['status']}: {error_of(job)[:300]}"
                return out
            if out.final_writes != 1 or out.running_writes != 0:
                out.detail = f"writes: {out.final_writes} final, {out.running_writes} RUNNING"
                return out
        out.ok = True
        return out

    # expect: failed
    try:
        job = wait_job_final(rig, admin, job_id, 120)
    except WorkerDied:
        raise
    except AssertionError as e:
        out.detail = str(e)
        return out
    job, out.final_writes, out.running_writes = job_state(admin, job_id)
    out.reason = error_of(job)
    if job["status"] != "FAILED" or expect["error"] not in out.reason:
        out.detail = f"job {job['status']}: {out.reason[:300]}"
        return out
    if "status" in expect and f": {expect['status']} " not in out.reason:
        out.detail = f"not answered {expect['status']}: {out.reason[:300]}"
        return out
    if out.final_writes != 1:
        out.detail = f"{out.final_writes} final writes"
        return out
    if not expect.get("transient") and out.running_writes > 1:
        out.detail = f"attempted {out.running_writes} times (non-transient)"
        return out
    out.ok = True
    return out


def good_job(rig: Rig, admin: Any) -> str:
    from worker.message import TASK_NAME, safe_kwargsrepr

    job_id = f"good-{uuid.uuid4().hex[:12]}"
    admin.create_job(
        id=job_id,
        tenant="acme",
        plugin_release=CLASSIFIER,
        params={"model": 12, "json": {"inputs": ROWS}},
    )
    kwargs = {
        "job": {
            "job_id": job_id,
            "tenant": "acme",
            "token": TOKENS["alice"],
            "model": 12,
            "json": {"inputs": ROWS},
            "release": CLASSIFIER,
        }
    }
    rig.producer.app.send_task(
        TASK_NAME, kwargs=kwargs, kwargsrepr=safe_kwargsrepr(kwargs), argsrepr="()"
    )
    return job_id


def check_good(rig: Rig, admin: Any, job_id: str) -> bool:
    try:
        job = wait_job_final(rig, admin, job_id, 120)
    except WorkerDied:
        raise
    except AssertionError:
        return False
    return job["status"] == "SUCCEEDED" and job["result"]["predictions"] == [
        "setosa",
        "virginica",
    ]


# --------------------------------------------------------------------------- the scenario


def escapes(model_dir: Path, cases: list[dict[str, Any]]) -> list[str]:
    """What the hostile archives could have left: files they aim outside the model
    directory, or a half-extracted directory of a refused model (the replicas remove
    a model's files on any refusal)."""
    found = [
        str(p)
        for p in (Path("/tmp/synapse-zip-absolute.txt"), Path("/tmp/synapse-tar-absolute.txt"))
        if p.exists()
    ]
    ids = {str(c["model"]["id"]) for c in cases if "archive" in c.get("model", {})}
    if model_dir.is_dir():
        for p in model_dir.rglob("*"):
            if p.name.startswith("synapse-") or p.name == "escape.txt":
                found.append(str(p))
            parts = p.name.lstrip(".").split("-")
            if len(parts) > 2 and parts[1] in ids:  # <tenant>-<id>-v<version>-<uuid>
                found.append(str(p))
    return found


def test_every_bad_input_gets_its_outcome_once_and_the_worker_keeps_serving(
    rig: Rig, admin: Any, tmp_path: Path, worker_env: dict[str, str]
) -> None:
    from tests import fault_kit

    cases = load_cases()
    seed_case_models(admin, cases, tmp_path)
    started = time.monotonic()
    tally = Tally()
    died = None
    try:
        for n, case in enumerate(cases):
            if n % GOOD_EVERY == 0:
                job_id = good_job(rig, admin)
                tally.good.append(job_id)
                tally.good_ok += check_good(rig, admin, job_id)
            tally.outcomes.append(run_case(rig, admin, case))
        job_id = good_job(rig, admin)
        tally.good.append(job_id)
        tally.good_ok += check_good(rig, admin, job_id)
    except WorkerDied as e:  # the rest of the cases never ran: counted as lost
        died = f"after case {tally.outcomes[-1].case if tally.outcomes else '-'}: {e}"

    # Afterwards, nothing came back: write logs unchanged (no late second attempt or
    # write), every message acknowledged, nothing left on the queue, the worker alive.
    summary = admin.write_summary([o.job_id for o in tally.outcomes if o.job_id])
    for o in tally.outcomes:
        later = o.job_id and summary[o.job_id]["final_writes"] + summary[o.job_id]["refused_final"]
        if o.job_id and later != max(o.final_writes, 1):
            o.ok = False
            o.detail += f" | final writes (attempts) later: {later}"
    r = rig.redis
    unacked = r.hlen("unacked")
    queued = sum(r.llen(k) for k in r.keys("inference") + r.keys("inference:*"))
    alive = rig.worker.proc.poll() is None
    log_text = rig.worker.log_path.read_text(errors="replace")
    # This worker and Redis saw real tokens in every shape of bad message: none may
    # surface in its log, a result, the outbox or a queued message's headers.
    from tests.test_security import leaks, scan_redis

    secret_leaks = leaks(log_text) + scan_redis(r)[0]
    escaped = escapes(Path(worker_env["SYNAPSE_BRIDGE_MODEL_DIR"]), cases)
    elapsed = time.monotonic() - started

    bad = [o for o in tally.outcomes if not o.ok]
    not_run = len(cases) - len(tally.outcomes)
    twice = sum(1 for o in tally.outcomes if o.final_writes > 1)
    outcome_of = {c["id"]: c["expect"]["outcome"] for c in cases}
    quarantined = sum(1 for o in tally.outcomes if o.ok and outcome_of[o.case] == "quarantined")
    right = len(tally.outcomes) - len(bad)
    counts = fault_kit.Counts(
        submitted=len(cases) + len(tally.good),
        succeeded=tally.good_ok,
        failed=right,
        lost=len(bad) + not_run + len(tally.good) - tally.good_ok,
        written_twice=twice,
    )
    kinds: dict[str, int] = {}
    for c in cases:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    fault_kit.record(
        "R5 bad input",
        load=f"{len(cases)} bad cases one by one + {len(tally.good)} good jobs, one worker",
        faults=", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
        counts=counts,
        rests_on="pydantic message schema + QuarantiningConsumer (inference.invalid); "
        "safe_extract bounds; error classes (4xx once, transient retried)",
        elapsed_s=elapsed,
        extra={
            "cases": len(cases),
            "quarantined": quarantined,
            "failed_as_expected": right - quarantined,
            "not_run": not_run,
            "worker_died": died,
            "good_jobs": len(tally.good),
            "wrong_outcome": [o.case for o in bad],
            "secret_leaks": len(secret_leaks),
            "escaped_files": len(escaped),
            "note": "failed = bad cases with their right outcome (FAILED or quarantined, "
            "once); succeeded = the good jobs between them; lost = cases without it",
        },
    )

    (rig.worker.log_path.parent / "bad-input-outcomes.json").write_text(
        json.dumps([o.__dict__ for o in tally.outcomes], indent=1)
    )
    report = "\n".join(f"  {o.case}: {o.detail} (got: {o.reason})" for o in bad)
    assert died is None, f"the worker stopped serving {died}\n{log_text[-2000:]}"
    assert not bad, f"{len(bad)} of {len(cases)} cases without the right outcome:\n{report}"
    assert twice == 0
    assert tally.good_ok == len(tally.good), "the worker stopped serving good jobs"
    assert alive, log_text[-3000:]
    assert "Unrecoverable error" not in log_text
    assert unacked == 0 and queued == 0, f"unacked {unacked}, still queued {queued}"
    assert not rig.marker.exists(), "a pickle body was unpickled"
    assert not secret_leaks, secret_leaks[:20]
    assert not escaped, f"hostile archives left files behind: {escaped}"
