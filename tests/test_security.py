"""R6, security: untrusted tokens refused, tenants kept apart, no secret written anywhere.

What is already covered elsewhere, and not repeated here:

* forged (wrong key), expired, ``alg: none``, tampered and garbage tokens answer 401 at
  the endpoint: ``test_serve_e2e.py::test_untrusted_tokens_are_401``; a user without a
  grant is refused at the endpoint after another user loaded the model:
  ``test_serve_e2e.py::test_user_without_access_is_refused_and_never_served_from_cache``;
* secrets masked in ``repr``/``str``/``model_dump_json`` of the settings (with
  ``SYNAPSE_ACCESS_TOKEN`` and ``SYNAPSE_SERVE_SIGNING_KEY`` set, from env and YAML):
  ``test_config.py``; ``ModelClaims``/``ModelKey`` reprs: ``test_tokens.py``; the log
  redaction processor: ``test_logging.py``;
* a pickle message quarantined, never unpickled: ``test_worker.py`` and the
  bad-input corpus (``test_bad_input.py``, with a pickle that would create a file).

Added here: at the deployment, untrusted tokens (also an SDK token signed with another
URL, HS512, an RS256 header, model-affine) never make the replica ask the backend or
download anything; through the worker, tenant A's token for tenant B's model and a
user without access after another user loaded the model fail 403 after one attempt;
a JWT given as the user token never surfaces; YAML, msgpack and pickle bodies are
quarantined and never run; validation errors never quote a field's value. Last, a scan
of every log the run produced (worker logs, the backend log, Ray's logs), every
Celery result and every other value in the test Redis (queue message headers, not
bodies: a message carries its token to the broker by design), the outbox hashes, and
every job's result, console logs and records on the backend: no user token, no JWT.
One row goes to the reliability table.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import ROOT, TOKENS, WorkerProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("worker_proc")]

JWT_RE = re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}")
CLASSIFIER = {"code": "example-classifier", "version": "1.0.0"}
ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]]
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
FRESH_MODEL = 961  # seeded here; nothing else in the session loads it
CORPUS = ROOT / "tests" / "data" / "bad_inputs"

# Every check of the module: (what, passed); the last test records the row.
CHECKS: list[tuple[str, bool]] = []
JOBS: list[str] = []
STARTED: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def _module_clock() -> None:
    STARTED.append(time.monotonic())


def check(what: str, ok: bool, detail: str = "") -> None:
    CHECKS.append((what, ok))
    assert ok, f"{what}: {detail}"


# --------------------------------------------------------------------------- scanning


def leaks(text: str) -> list[str]:
    """What secret-looking values ``text`` holds, named (never quoted whole)."""
    found = [f"token of {user}" for user, token in TOKENS.items() if token in text]
    found += [f"JWT {m[:10]}..." for m in JWT_RE.findall(text)]
    return found


def _envelope_without_body(raw: bytes) -> str:
    """A kombu message envelope as text, its body left out (it carries the token)."""
    try:
        envelope = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
    if isinstance(envelope, list) and envelope and isinstance(envelope[0], dict):
        envelope = envelope[0]  # the unacked hash: [message, exchange, routing_key]
    if isinstance(envelope, dict) and "body" in envelope:
        envelope = {k: v for k, v in envelope.items() if k != "body"}
    return json.dumps(envelope)


def scan_redis(r: Any) -> tuple[list[str], int]:
    """Secrets in a Redis: results, outboxes, claims, checkpoints, and the headers and
    properties of queued messages (their bodies are left out: see the module doc)."""
    problems: list[str] = []
    keys = 0
    for key in r.scan_iter(count=1000):
        keys += 1
        name = key.decode(errors="replace")
        kind = r.type(key)
        texts: list[str] = []
        if kind == b"string":
            texts.append((r.get(key) or b"").decode(errors="replace"))
        elif kind == b"hash":
            for f, v in r.hgetall(key).items():
                if name == "unacked":
                    texts.append(_envelope_without_body(v))
                else:
                    texts.append(f.decode(errors="replace") + " " + v.decode(errors="replace"))
        elif kind == b"list":
            texts += [_envelope_without_body(m) for m in r.lrange(key, 0, -1)]
        elif kind == b"set":
            texts += [m.decode(errors="replace") for m in r.smembers(key)]
        elif kind == b"zset":
            texts += [m.decode(errors="replace") for m in r.zrange(key, 0, -1)]
        for text in texts:
            problems += [f"redis {name}: {leak}" for leak in leaks(text)]
    return problems, keys


def ray_logs_dir() -> Path | None:
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        if node is not None:
            return Path(node.get_logs_dir_path())
    except Exception:
        pass
    latest = Path("/tmp/ray/session_latest/logs")
    return latest if latest.is_dir() else None


def scan_files(paths: list[Path]) -> tuple[list[str], int, int]:
    problems: list[str] = []
    n = size = 0
    for path in paths:
        if not path.is_file():
            continue
        n += 1
        data = path.read_bytes()
        size += len(data)
        text = data.decode(errors="replace")
        for leak in leaks(text):
            line = next((i for i, ln in enumerate(text.splitlines(), 1) if leak in leaks(ln)), "?")
            problems.append(f"{path}:{line}: {leak}")
    return problems, n, size


# --------------------------------------------------------------------------- helpers


def close_producer(producer: Any) -> None:
    """``fault_kit.Producer.close``, tolerating a Producer that holds no Redis client."""
    try:
        producer.close()
    except AttributeError:
        producer.app.close()


def new_job(admin: Any, *, model: int = 12, tenant: str = "acme") -> str:
    job_id = f"sec-{uuid.uuid4().hex[:12]}"
    admin.create_job(
        id=job_id,
        tenant=tenant,
        plugin_release=CLASSIFIER,
        params={"model": model, "json": {"inputs": ROWS}},
    )
    JOBS.append(job_id)
    return job_id


def send(job_id: str, *, token: str, model: int = 12, tenant: str = "acme") -> None:
    from worker.submit import submit

    submit(
        job_id=job_id,
        model=model,
        token=token,
        tenant=tenant,
        release=CLASSIFIER,
        json={"inputs": ROWS},
    )


def wait_final(admin: Any, job_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        lambda: (j := admin.job(job_id))["status"] in FINAL and j,
        timeout=timeout,
        interval=0.1,
        what=f"job {job_id} final",
    )


def writes(admin: Any, job_id: str) -> tuple[int, int]:
    log = admin.writes(job_id)
    final = sum(1 for w in log if w["body"].get("status") in FINAL)
    running = sum(1 for w in log if w["body"].get("status") == "RUNNING")
    return final, running


def replica_stats(app_name: str) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("ClassifierDeployment", app_name)
    return handle.model_stats.remote().result(timeout_s=60)


def refused_once(admin: Any, job_id: str, status: str) -> tuple[bool, str]:
    job = wait_final(admin, job_id)
    final, running = writes(admin, job_id)
    error = str((job.get("result") or {}).get("error", ""))
    ok = (
        job["status"] == "FAILED"
        and status in error
        and final == 1
        and running == 1
        and job["metrics_record"]["attempts"] == 1
        and "predictions" not in json.dumps(job.get("result"))
    )
    return ok, f"{job['status']} final={final} running={running}: {error[:200]}"


# --------------------------------------------------------------------------- endpoint


@pytest.fixture(scope="module")
def fresh_model(admin_module: Any, model_archives: dict[int, Path]) -> int:
    admin_module.seed(
        {
            "models": [
                {
                    "id": FRESH_MODEL,
                    "name": "security-fresh",
                    "tenant": "acme",
                    "version": 1,
                    "archive": str(model_archives[12]),
                }
            ]
        }
    )
    return FRESH_MODEL


@pytest.fixture(scope="module")
def admin_module(backend: Any) -> Any:
    from local_backend.client import AdminClient

    with AdminClient(backend.url) as client:
        yield client


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def untrusted_tokens(backend_url: str, model: int) -> dict[str, str]:
    claims = {"model": str(model), "token": TOKENS["alice"], "tenant": "acme"}
    good_for_12 = jwt.encode({**claims, "model": "12"}, backend_url, algorithm="HS256")
    header, _, sig = good_for_12.split(".")
    payload = _b64(json.dumps(claims).encode())
    rs256_header = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    rs256_sig = _b64(
        hmac.new(
            backend_url.encode(), f"{rs256_header}.{payload}".encode(), hashlib.sha256
        ).digest()
    )
    none_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return {
        # An SDK token (HS256, a URL as key) minted for another backend's URL.
        "sdk_token_wrong_url": jwt.encode(claims, "http://other-backend:8010", algorithm="HS256"),
        "sdk_token_url_with_slash": jwt.encode(claims, backend_url + "/", algorithm="HS256"),
        "alg_none": f"{none_header}.{payload}.",
        "alg_none_with_signature": f"{none_header}.{payload}.{sig}",
        # A valid token for model 12 with its payload swapped for this model.
        "tampered_payload": f"{header}.{payload}.{sig}",
        "expired": jwt.encode(
            {**claims, "exp": int(time.time()) - 60}, backend_url, algorithm="HS256"
        ),
        "hs512": jwt.encode(claims, backend_url, algorithm="HS512"),
        "rs256_header_hmac_signed": f"{rs256_header}.{payload}.{rs256_sig}",
    }


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_untrusted_tokens_never_reach_the_backend_or_load_a_model(
    example_app: Any, serve_env: dict[str, str], admin: Any, fresh_model: int
) -> None:
    from serve_runtime.tokens import AFFINE_TOKEN_HEADER, MODEL_TOKEN_HEADER

    url = f"{serve_env['SYNAPSE_SERVE_URL']}{example_app.route_prefix}/"
    backend_url = serve_env["SYNAPSE_HOST"]
    before = admin.stats()
    assert before["downloads_by_model"].get(str(fresh_model), 0) == 0
    assert before["model_gets"].get(str(fresh_model), 0) == 0
    tokens = untrusted_tokens(backend_url, fresh_model)
    answers = {}
    for kind, token in tokens.items():
        for mode in ("compatible", "model_affine"):
            headers = (
                {MODEL_TOKEN_HEADER: token}
                if mode == "compatible"
                else {MODEL_TOKEN_HEADER: f"acme:{fresh_model}", AFFINE_TOKEN_HEADER: token}
            )
            r = httpx.post(url, json={"inputs": ROWS}, headers=headers, timeout=60)
            answers[f"{kind}/{mode}"] = r.status_code
            check(
                f"endpoint refuses {kind} ({mode})",
                r.status_code == 401 and TOKENS["alice"] not in r.text and token not in r.text,
                f"{r.status_code} {r.text[:200]}",
            )
    after = admin.stats()
    check(
        "no untrusted token made the replica ask the backend or download",
        after["model_gets"].get(str(fresh_model), 0) == 0
        and after["downloads_by_model"].get(str(fresh_model), 0) == 0,
        f"model GETs {after['model_gets'].get(str(fresh_model))}, "
        f"downloads {after['downloads_by_model'].get(str(fresh_model))}",
    )
    # The probe can see a load: the same request with a real token loads it once.
    good = jwt.encode(
        {"model": str(fresh_model), "token": TOKENS["alice"], "tenant": "acme"},
        backend_url,
        algorithm="HS256",
    )
    r = httpx.post(url, json={"inputs": ROWS}, headers={MODEL_TOKEN_HEADER: good}, timeout=120)
    assert r.status_code == 200, r.text
    assert admin.stats()["downloads_by_model"].get(str(fresh_model), 0) == 1


# --------------------------------------------------------------------------- the worker


def test_tenant_a_token_for_tenant_b_model_fails_403_once(admin: Any) -> None:
    for tenant in ("acme", "globex"):  # eve names acme's tenant, or her own
        job_id = new_job(admin, model=12, tenant=tenant)
        send(job_id, token=TOKENS["eve"], model=12, tenant=tenant)
        ok, detail = refused_once(admin, job_id, "403")
        check(f"eve's token for acme's model 12 (tenant {tenant}): 403 once", ok, detail)


def test_user_without_access_never_served_from_a_loaded_copy(admin: Any, example_app: Any) -> None:
    loaded = new_job(admin, model=13)
    send(loaded, token=TOKENS["alice"], model=13)  # alice has a grant on 13
    job = wait_final(admin, loaded)
    assert job["status"] == "SUCCEEDED", job["result"]
    resident = [r for r in replica_stats(example_app.app_name)["resident"] if r["ident"][1] == "13"]
    assert resident, "alice's copy of model 13 is loaded"
    downloads = admin.stats()["downloads_by_model"].get("13", 0)
    refused = new_job(admin, model=13)
    send(refused, token=TOKENS["carol"], model=13)  # same tenant, no grant
    ok, detail = refused_once(admin, refused, "403")
    check("carol on model 13 after alice loaded it: 403 once", ok, detail)
    check(
        "carol's refusal loaded nothing",
        admin.stats()["downloads_by_model"].get("13", 0) == downloads,
        "model 13 downloaded again",
    )


def test_a_jwt_given_as_the_user_token_never_surfaces(
    admin: Any, serve_env: dict[str, str]
) -> None:
    from serve_runtime.tokens import create_serve_multiplexed_model_id

    token = create_serve_multiplexed_model_id(12, TOKENS["alice"], serve_env["SYNAPSE_HOST"])
    job_id = new_job(admin)
    send(job_id, token=token)
    job = wait_final(admin, job_id)
    text = json.dumps(job)
    check(
        "a JWT as the user token: refused (401), not quoted",
        job["status"] == "FAILED" and "401" in text and not leaks(text),
        text[:300],
    )


def test_only_json_is_accepted_on_the_queue(
    admin: Any, redis_url: str, worker_proc: WorkerProcess, session_dir: Path
) -> None:
    """YAML, msgpack and pickle bodies (the pickle would create a file if loaded) go to
    ``inference.invalid`` unread; the job id they carry never appears in the worker."""
    import redis

    from tests.fault_kit import Producer
    from worker.consumer import REASON_HEADER

    r = redis.Redis.from_url(redis_url)
    marker = session_dir / "security-pickle-ran"
    producer = Producer(redis_url, redis_url)
    try:
        for body_file, content_type, encoding in [
            ("task.yaml", "application/x-yaml", "utf-8"),
            ("task.msgpack", "application/x-msgpack", "binary"),
            ("rce.pickle", "application/x-python-serialize", "binary"),
        ]:
            job_id = f"sec-nonjson-{uuid.uuid4().hex[:10]}"
            body = (CORPUS / "bodies" / body_file).read_bytes()
            for k, v in {
                "$JOB_ID": job_id,
                "$TOKEN:alice": TOKENS["alice"],
                "$MARKER": str(marker),
            }.items():
                body = body.replace(k.encode(), v.encode())
            before = r.llen("inference.invalid")
            tag = uuid.uuid4().hex
            producer.send_raw(
                body,
                content_type=content_type,
                content_encoding=encoding,
                headers={
                    "task": "synapse.inference.run",
                    "id": tag,
                    "lang": "py",
                    "argsrepr": "()",
                    "kwargsrepr": "{...}",
                },
            )
            wait_for(
                lambda b=before: r.llen("inference.invalid") > b,
                timeout=60,
                what=f"{content_type} quarantined",
            )
            mine = [
                json.loads(m)
                for m in r.lrange("inference.invalid", 0, -1)
                if json.loads(m).get("headers", {}).get("id") == tag
            ]
            reason = mine[0]["headers"].get(REASON_HEADER, "") if mine else ""
            check(
                f"{content_type} refused",
                len(mine) == 1 and "refused (JSON only)" in reason,
                f"{len(mine)} quarantined: {reason}",
            )
            check(
                f"{content_type} never run",
                job_id not in worker_proc.log_path.read_text(errors="replace"),
                "its job id reached the worker's log",
            )
    finally:
        close_producer(producer)
    # The worker still serves (and its log is past those messages).
    job_id = new_job(admin)
    send(job_id, token=TOKENS["alice"])
    assert wait_final(admin, job_id)["status"] == "SUCCEEDED"
    check("the pickle was never unpickled", not marker.exists())


@pytest.mark.parametrize(
    "field",
    ["job_id", "tenant", "model", "method", "json", "items", "release", "priority", "deadline"],
)
def test_validation_errors_never_quote_a_value(field: str) -> None:
    from worker.message import InvalidJob, parse_job

    secret = TOKENS["alice"]
    raw: dict[str, Any] = {
        "job_id": "j1",
        "token": secret,
        "model": 12,
        "json": {"inputs": ROWS},
        "release": CLASSIFIER,
    }
    raw[field] = {"priority": secret} if field == "json" else [secret]
    if field == "json":
        raw["items"] = [{"x": secret}]  # both payloads: invalid
    if field == "release":
        raw["release"] = {"code": "c", "checksum": secret + "/.."}
    with pytest.raises(InvalidJob) as info:
        parse_job(raw)
    text = f"{info.value} {info.value!r} {info.value.args}"
    check(f"validation error for {field} quotes no value", secret not in text, text[:200])


def test_job_message_reprs_mask_the_token() -> None:
    from worker.message import parse_job, safe_kwargsrepr

    raw = {
        "job_id": "j1",
        "token": TOKENS["alice"],
        "model": 12,
        "json": {"inputs": ROWS},
        "release": CLASSIFIER,
    }
    msg = parse_job(raw)
    shown = [
        repr(msg),
        str(msg),
        msg.safe_repr(),
        repr(msg.model_dump()),
        safe_kwargsrepr({"job": raw}),
    ]
    check("JobMessage reprs mask the token", not any(leaks(s) for s in shown), str(shown)[:300])
    sealed = msg.wire()["token"]  # the broker copy carries it sealed, not readable
    assert sealed.startswith("sealed:v1:") and TOKENS["alice"] not in sealed
    assert parse_job(msg.wire()).token.get_secret_value() == TOKENS["alice"]


# --------------------------------------------------------------------------- the scan


def test_no_token_or_jwt_in_any_log_result_or_job(
    admin: Any,
    backend: Any,
    redis_url: str,
    session_dir: Path,
    worker_proc: WorkerProcess,
) -> None:
    """Everything the run wrote so far: logs, Redis, the backend's jobs and logs."""
    from tests import fault_kit

    logs = [*sorted(session_dir.rglob("*.log")), Path(backend.log_path)]
    ray_dir = ray_logs_dir()
    ray_files = sorted(p for p in ray_dir.rglob("*") if p.is_file()) if ray_dir else []
    problems, n_files, n_bytes = scan_files(logs + ray_files)
    import redis

    r = redis.Redis.from_url(redis_url)
    redis_problems, n_keys = scan_redis(r)
    problems += redis_problems
    # The scanner sees tokens where they legitimately are: quarantined bodies (the
    # YAML one above carries alice's token) are left out of the scan, not unreadable.
    bodies = [json.loads(m).get("body", "") for m in r.lrange("inference.invalid", 0, -1)]
    decoded = [base64.b64decode(b).decode(errors="replace") for b in bodies if b]
    assert any(leaks(text) for text in decoded), "the scan's positive control found nothing"
    jobs = admin.jobs()
    for job in jobs:
        written = {
            k: job.get(k)
            for k in (
                "result",
                "console_logs",
                "metrics_record",
                "progress_record",
                "meta",
                "status",
            )
        }
        problems += [f"job {job['id']}: {leak}" for leak in leaks(json.dumps(written))]
    for entry in admin.logs():
        problems += [f"backend log entry: {leak}" for leak in leaks(json.dumps(entry))]

    CHECKS.append(("no secret in logs, Redis, results or jobs", not problems))
    twice = admin.outcomes(JOBS).written_twice
    refused = sum(ok for _, ok in CHECKS)
    fault_kit.record(
        "R6 security",
        load=f"{len(CHECKS)} checks, {len(JOBS)} jobs through the session worker",
        faults="forged/expired/none/tampered/HS512/RS256-header tokens at the endpoint; "
        "cross-tenant and no-grant tokens through the worker; JWT as user token; "
        "YAML/msgpack/pickle bodies; secrets in every job field",
        counts=fault_kit.Counts(
            submitted=len(CHECKS),
            failed=refused,
            lost=len(CHECKS) - refused,
            written_twice=twice,
        ),
        rests_on="HS256-only token check before any backend call; per-caller "
        "authorization before a shared copy serves; JSON-only consumer; redaction "
        "processor and secret-free error texts",
        elapsed_s=time.monotonic() - STARTED[0],
        extra={
            "scanned_files": n_files,
            "scanned_bytes": n_bytes,
            "scanned_redis_keys": n_keys,
            "scanned_jobs": len(jobs),
            "leaks": len(problems),
            "note": "each check is one attack or probe: failed = refused as it must be, "
            "lost = let through (or a secret found by the scan)",
        },
    )
    assert n_files >= 2 and jobs
    assert not problems, "secrets found:\n" + "\n".join(problems[:50])
    assert twice == 0
