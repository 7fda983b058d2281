"""Issue 12 item 7: ids that reach backend URL paths or model keys are checked first.

The character set is config/ids.py's. A model, tenant or job id outside it is refused
with an error naming the field, before any request: at the replica (400
``invalid_model_id`` / ``invalid_tenant``, the backend never asked), in the worker (the
message quarantined, its job FAILED), in ``infer_remote``, the worker's backend client
and the local backend's admin client.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import jwt
import pytest

from config.ids import (
    InvalidId,
    check_job_id,
    check_model_id,
    check_tenant,
    check_version,
)
from tests.conftest import TOKENS, wait_for

# Every id that must never reach a URL path or a key as it is.
BAD_IDS = [
    "..",
    ".",
    "a/b",
    "%2e%2e",
    "12/../13",
    "../13",
    "?x=1",
    "12?x=1",
    "#",
    "12#frag",
    " ",
    "12 13",
    "12\r\nX-Evil: 1",
    "12\n",  # a trailing newline passes a ``re.match(...$)``
    "\uff11\uff12",  # fullwidth digits 12
    "m\u043edel",  # a Cyrillic o
    "\u212a",  # the Kelvin sign (a K under re.IGNORECASE)
    "\u0661\u0662",  # Arabic-Indic digits (\\d matches them)
    "",
    "x" * 129,
    "a:b",
    "-12",
    "_x",
    "12\x00",
    "12\\13",
]
GOOD_MODEL_IDS = ["12", "a", "model-1.2_b", "A" * 128, "1.0.0", "v2"]


# --------------------------------------------------------------------------- config.ids


@pytest.mark.parametrize("value", BAD_IDS)
@pytest.mark.parametrize("check", [check_model_id, check_tenant, check_version])
def test_bad_ids_are_refused_naming_the_field(check: Any, value: str) -> None:
    with pytest.raises(InvalidId) as info:
        check(value, "the field")
    assert info.value.field == "the field"
    assert "invalid the field" in str(info.value)
    assert "allowed are" in str(info.value)
    assert len(str(info.value)) < 300  # never echoes huge input


@pytest.mark.parametrize("value", [v for v in BAD_IDS if v != "a:b"])
def test_bad_job_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidId):
        check_job_id(value)


@pytest.mark.parametrize("value", GOOD_MODEL_IDS)
def test_good_model_ids_pass(value: str) -> None:
    assert check_model_id(value) == value
    assert check_version(value) == value


def test_model_ids_as_ints() -> None:
    assert check_model_id(12) == "12"
    assert check_model_id(0) == "0"
    for bad in (-1, True, 1.5, None, [12], {"id": 12}):
        with pytest.raises(InvalidId):
            check_model_id(bad)


def test_tenant_and_job_id_bounds() -> None:
    assert check_tenant("acme") == "acme"
    assert check_tenant("a" * 100) == "a" * 100
    with pytest.raises(InvalidId):
        check_tenant("a" * 101)
    assert check_job_id("job:1.a-b_c") == "job:1.a-b_c"  # ':' is a job id's only
    assert check_job_id("j" * 128) == "j" * 128
    with pytest.raises(InvalidId):
        check_job_id("j" * 129)
    with pytest.raises(InvalidId):
        check_tenant(None)


def test_a_huge_or_secret_value_is_not_echoed() -> None:
    with pytest.raises(InvalidId) as info:
        check_model_id("/" * 1_000_000)
    assert len(str(info.value)) < 300
    assert "1000000 chars" in str(info.value)
    bearer = f"Bearer {TOKENS['alice']}/.."
    with pytest.raises(InvalidId) as info:
        check_model_id(bearer)
    assert TOKENS["alice"] not in str(info.value)


# --------------------------------------------------------------------------- tokens


def _sdk_jwt(claims: dict[str, Any], key: str) -> str:
    """An SDK-style token minted without our checks (the SDK signs whatever it is given)."""
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("model", ["../13", "12/../13", "%2e%2e", "a:b", "12\n"])
def test_model_claims_outside_the_set_are_refused(model: str) -> None:
    from serve_runtime.tokens import (
        InvalidClaimId,
        create_serve_multiplexed_model_id,
        decode_model_token,
    )

    key = "http://backend.example"
    with pytest.raises(InvalidClaimId) as minted:
        create_serve_multiplexed_model_id(model, TOKENS["alice"], key)
    assert minted.value.code == "invalid_model_id"
    token = _sdk_jwt({"model": model, "token": TOKENS["alice"]}, key)
    with pytest.raises(InvalidClaimId) as decoded:
        decode_model_token(token, key)
    assert decoded.value.code == "invalid_model_id"
    assert "model claim" in str(decoded.value)
    assert TOKENS["alice"] not in str(decoded.value)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_tenant_claims_and_model_keys_outside_the_set_are_refused() -> None:
    from serve_runtime.tokens import (
        InvalidClaimId,
        ModelKey,
        create_serve_multiplexed_model_id,
        decode_model_token,
    )

    key = "http://backend.example"
    with pytest.raises(InvalidClaimId) as info:
        create_serve_multiplexed_model_id(12, TOKENS["alice"], key, tenant="acme/../globex")
    assert info.value.code == "invalid_tenant"
    token = _sdk_jwt({"model": "12", "token": TOKENS["alice"], "tenant": "acme\r\nX: 1"}, key)
    with pytest.raises(InvalidClaimId) as info:
        decode_model_token(token, key)
    assert info.value.code == "invalid_tenant"
    # Good ones still round-trip.
    good = create_serve_multiplexed_model_id(12, TOKENS["alice"], key, tenant="acme")
    assert decode_model_token(good, key).model == "12"
    assert ModelKey.parse("acme:12:3") == ModelKey("acme", "12", "3")
    assert ModelKey.parse("-:12") == ModelKey(None, "12")
    for text, code in [
        ("acme:..", "invalid_model_id"),
        ("acme:%2e%2e", "invalid_model_id"),
        ("acme:12:../1", "invalid_model_id"),
        ("ac me:12", "invalid_tenant"),
        ("..:12", "invalid_tenant"),
    ]:
        with pytest.raises(InvalidClaimId) as info:
            ModelKey.parse(text)
        assert info.value.code == code, text


# --------------------------------------------------------------------------- callers


def test_infer_remote_refuses_a_bad_model_before_any_call() -> None:
    from serve_runtime.remote import infer_remote

    env = {
        "SYNAPSE_HOST": "http://127.0.0.1:9",  # nothing listens: a call would be a 5xx
        "SYNAPSE_ACCESS_TOKEN": TOKENS["alice"],
        "SYNAPSE_PLUGIN_RELEASE_CODE": "probe",
    }
    for model in ("../13", "12/../13", "a:b"):
        with pytest.raises(ValueError, match=r"params\['model'\]"):
            infer_remote({"model": model, "json": {}}, env)
    with pytest.raises(ValueError, match="tenant"):
        infer_remote({"model": 12, "json": {}, "tenant": "acme/.."}, env)


def test_the_replicas_backend_client_never_sends_a_bad_model_id() -> None:
    from serve_runtime.backend_client import BackendClient, ModelAccessError

    async def go(model_id: str, tenant: str = "acme") -> ModelAccessError:
        client = BackendClient("http://127.0.0.1:9")  # a request would answer 503
        try:
            await client.get_model(model_id, TOKENS["alice"], tenant)
        except ModelAccessError as e:
            return e
        finally:
            await client.aclose()
        raise AssertionError("no error")

    for model_id in ("../13", "12/../13", "%2e%2e", ".", "12?x=1"):
        e = asyncio.run(go(model_id))
        assert (e.status, e.code) == (400, "invalid_model_id"), (model_id, e)
    e = asyncio.run(go("12", tenant="acme\r\nX-Evil: 1"))
    assert (e.status, e.code) == (400, "invalid_tenant"), e


def test_the_workers_backend_client_never_sends_a_bad_job_id_or_tenant() -> None:
    from config import load_settings
    from worker.backend_api import BackendAPI, BackendInvalidRequest, job_path

    for job_id in ("../x", "a/b", "a?b", "a\n", "", "a b"):
        with pytest.raises(BackendInvalidRequest, match="job id"):
            job_path(job_id)
    api = BackendAPI(
        load_settings(synapse_host="http://127.0.0.1:9", access_token=TOKENS["service"])
    )
    try:
        with pytest.raises(BackendInvalidRequest, match="tenant"):  # not a 5xx: never sent
            api.get_job("job-1", tenant="acme/../globex")
    finally:
        api.close()


def test_the_admin_client_never_puts_a_bad_job_id_in_a_path() -> None:
    from local_backend.client import AdminClient

    with AdminClient("http://127.0.0.1:9") as admin:  # a request would be a ConnectError
        for job_id in ("../jobs", "a/b", "a?b", "%2e%2e", ""):
            for call in (admin.job, admin.writes, admin.stop_job):
                with pytest.raises(ValueError, match="not a job id"):
                    call(job_id)


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", "12/../13"), ("model", "../13"), ("model", ""), ("tenant", "acme/../globex")],
)
def test_a_job_message_with_a_bad_id_is_invalid_naming_the_field(field: str, value: str) -> None:
    from worker.message import InvalidJob, parse_job

    raw = {
        "job_id": "j1",
        "token": TOKENS["alice"],
        "model": 12,
        "tenant": "acme",
        "json": {},
        "release": {"code": "probe"},
    }
    raw[field] = value
    with pytest.raises(InvalidJob) as info:
        parse_job(raw)
    assert str(info.value).startswith(f"invalid job message: {field}:"), str(info.value)
    assert "allowed are" in str(info.value) or "non-empty" in str(info.value)
    assert info.value.job_id == "j1"
    if value:  # validation errors quote no value (tests/test_security.py)
        assert value not in str(info.value), str(info.value)


# --------------------------------------------------------------------------- end to end


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_the_replica_answers_400_and_never_asks_the_backend(
    probe_app: Any, serve_env: dict[str, str], admin: Any
) -> None:
    """A JWT whose model claim leaves ``models/`` gets 400 and no backend request."""
    from serve_runtime.tokens import AFFINE_TOKEN_HEADER, MODEL_TOKEN_HEADER

    url = f"{serve_env['SYNAPSE_SERVE_URL']}{probe_app.route_prefix}/"
    key = serve_env["SYNAPSE_HOST"]
    cases = [
        ({"model": "../13", "token": TOKENS["alice"], "tenant": "acme"}, "invalid_model_id"),
        ({"model": "12/../13", "token": TOKENS["alice"]}, "invalid_model_id"),
        ({"model": "%2e%2e", "token": TOKENS["alice"]}, "invalid_model_id"),
        ({"model": "13?x=1", "token": TOKENS["alice"]}, "invalid_model_id"),
        ({"model": "12", "token": TOKENS["alice"], "tenant": "acme/../x"}, "invalid_tenant"),
    ]
    admin.clear_requests()
    for claims, code in cases:
        r = httpx.post(
            url, json={"x": 1}, headers={MODEL_TOKEN_HEADER: _sdk_jwt(claims, key)}, timeout=60
        )
        assert r.status_code == 400, (claims["model"], r.status_code, r.text)
        detail = r.json()["detail"]
        assert detail["code"] == code, detail
        assert TOKENS["alice"] not in r.text
    # Model-affine: the key itself is the bad id.
    good = _sdk_jwt({"model": "12", "token": TOKENS["alice"], "tenant": "acme"}, key)
    r = httpx.post(
        url,
        json={"x": 1},
        headers={MODEL_TOKEN_HEADER: "acme:..", AFFINE_TOKEN_HEADER: good},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["detail"]["code"] == "invalid_model_id", r.text
    seen = [q for q in admin.requests() if not q["path"].startswith("/jobs")]  # the intake
    assert seen == [], seen
    # The same replica still serves a good id (and the backend then sees it).
    r = httpx.post(url, json={"x": 1}, headers={MODEL_TOKEN_HEADER: good}, timeout=120)
    assert r.status_code == 200, r.text
    assert any(q["path"] == "/models/12/" for q in admin.requests())


def test_a_worker_job_with_a_bad_model_id_is_quarantined_and_failed(
    admin: Any, worker_proc: Any
) -> None:
    """``12/../13`` would reach ``models/13/`` (httpx resolves dot segments): refused."""
    from worker.app import app
    from worker.message import INVALID_QUEUE, TASK_NAME
    from worker.services import services

    job_id = uuid.uuid4().hex
    admin.create_job(
        id=job_id,
        tenant="acme",
        plugin_release={"code": "probe", "version": "0.1.0"},
        params={"model": "12/../13"},
    )
    r = services().redis
    before = r.llen(INVALID_QUEUE)
    app.send_task(
        TASK_NAME,
        kwargs={
            "job": {
                "job_id": job_id,
                "token": TOKENS["alice"],
                "tenant": "acme",
                "model": "12/../13",
                "json": {"x": 1},
                "release": {"code": "probe", "version": "0.1.0"},
            }
        },
    )
    job = wait_for(
        lambda: (j := admin.job(job_id))["status"] in {"SUCCEEDED", "FAILED", "STOPPED"} and j,
        timeout=60,
        what=f"job {job_id} final",
    )
    assert job["status"] == "FAILED", job
    error = job["result"]["error"]
    assert "model: Value error, invalid model id" in error, error
    assert "12/../13" not in error  # validation errors quote no value
    wait_for(lambda: r.llen(INVALID_QUEUE) > before, what="message quarantined")
    quarantined = [json.loads(m) for m in r.lrange(INVALID_QUEUE, 0, -1)]
    assert any(job_id in json.dumps(m) for m in quarantined)
    assert [w for w in admin.writes(job_id) if w["body"].get("status") == "RUNNING"] == []
