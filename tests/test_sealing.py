"""Sealed tokens (worker/sealing.py) and redacted copies (worker/message.py).

No Redis, no Ray: the sealer, the message's wire form and the redaction of a body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet

from config.settings import SettingsError, get_settings, load_settings
from tests.conftest import TOKENS

USER_TOKEN = TOKENS["alice"]
SERVICE = TOKENS["service"]
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJtb2RlbCI6IjEyIiwidG9rZW4iOiJ4In0.c2lnbmF0dXJlX2hlcmU"


def raw_job(token: str = USER_TOKEN, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": "seal-1",
        "tenant": "acme",
        "token": token,
        "model": 12,
        "json": {"inputs": [[5.1, 3.5, 1.4, 0.2]]},
        "release": {"code": "example-classifier", "version": "1.0.0"},
        **extra,
    }


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The process-wide settings with the service token and no explicit sealing key."""
    monkeypatch.delenv("SYNAPSE_BRIDGE_SEALING_KEY", raising=False)
    monkeypatch.setenv("SYNAPSE_ACCESS_TOKEN", SERVICE)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def sealer_of(**settings: Any) -> Any:
    """A sealer from these settings alone: no key of the session's environment."""
    from worker.sealing import sealer

    return sealer(load_settings(**{"sealing_key": None, **settings}))


# --------------------------------------------------------------------------- the sealer


def test_seal_open_round_trip_with_an_explicit_key() -> None:
    from worker.sealing import PREFIX, is_sealed

    s = sealer_of(sealing_key=Fernet.generate_key().decode())
    sealed = s.seal(USER_TOKEN)
    assert sealed.startswith(PREFIX) and is_sealed(sealed)
    assert USER_TOKEN not in sealed
    assert s.open(sealed) == USER_TOKEN
    assert s.seal(sealed) == sealed  # sealing twice is sealing once
    assert s.open(USER_TOKEN) == USER_TOKEN  # a plain token is a plain token


def test_the_key_derived_from_the_service_token_is_shared_by_every_process() -> None:
    a = sealer_of(access_token=SERVICE)
    b = sealer_of(access_token=SERVICE)
    assert b.open(a.seal(USER_TOKEN)) == USER_TOKEN
    assert a is b  # one Sealer per key (cached by the key, no module global)


def test_wrong_key_is_a_clear_error_without_the_token() -> None:
    from worker.sealing import UnsealError

    sealed = sealer_of(access_token=SERVICE).seal(USER_TOKEN)
    for other in (
        sealer_of(access_token="another-service-token"),
        sealer_of(sealing_key=Fernet.generate_key().decode()),
    ):
        with pytest.raises(UnsealError) as info:
            other.open(sealed)
        text = f"{info.value} {info.value!r}"
        assert "SYNAPSE_BRIDGE_SEALING_KEY" in text
        assert USER_TOKEN not in text and sealed not in text


def test_a_tampered_sealed_token_does_not_open() -> None:
    from worker.sealing import UnsealError

    s = sealer_of(access_token=SERVICE)
    sealed = s.seal(USER_TOKEN)
    flipped = sealed[:-5] + ("A" if sealed[-5] != "A" else "B") + sealed[-4:]
    with pytest.raises(UnsealError):
        s.open(flipped)
    with pytest.raises(UnsealError):
        s.open("sealed:v1:not-base64-at-all")


def test_key_rotation_new_key_seals_old_key_still_opens() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealed_by_old = sealer_of(sealing_key=old).seal(USER_TOKEN)
    rotating = sealer_of(sealing_key=f"{new},{old}")
    assert rotating.open(sealed_by_old) == USER_TOKEN
    assert sealer_of(sealing_key=new).open(rotating.seal(USER_TOKEN)) == USER_TOKEN


def test_no_key_at_all_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.sealing import sealer

    monkeypatch.delenv("SYNAPSE_BRIDGE_SEALING_KEY", raising=False)
    monkeypatch.delenv("SYNAPSE_ACCESS_TOKEN", raising=False)
    with pytest.raises(SettingsError, match="SYNAPSE_BRIDGE_SEALING_KEY"):
        sealer(load_settings())


def test_a_malformed_key_names_the_setting_not_the_value() -> None:
    with pytest.raises(SettingsError, match="SYNAPSE_BRIDGE_SEALING_KEY") as info:
        sealer_of(sealing_key="too-short-a-secret")
    assert "too-short-a-secret" not in str(info.value)


# --------------------------------------------------------------------------- the message


def test_wire_carries_the_token_sealed_and_parse_opens_it(env: pytest.MonkeyPatch) -> None:
    from worker.message import parse_job
    from worker.sealing import PREFIX

    job = parse_job(raw_job())
    assert job.token.get_secret_value() == USER_TOKEN  # plain in memory, for the call
    wire = job.wire()
    text = json.dumps(wire)
    assert USER_TOKEN not in text, "the plain token is in the wire form"
    assert wire["token"].startswith(PREFIX)
    again = parse_job(wire)
    assert again.token.get_secret_value() == USER_TOKEN
    assert again.wire()["job_id"] == "seal-1"
    for shown in (repr(job), str(job), job.safe_repr(), repr(job.model_dump())):
        assert USER_TOKEN not in shown and wire["token"] not in shown
    assert USER_TOKEN not in job.model_dump_json()  # only wire() lets the token out


def test_wire_and_parse_take_an_explicit_sealer() -> None:
    from worker.message import parse_job

    mine = sealer_of(sealing_key=Fernet.generate_key().decode())
    wire = parse_job(raw_job(), sealer=mine).wire(sealer=mine)
    assert parse_job(wire, sealer=mine).token.get_secret_value() == USER_TOKEN


def test_a_plain_token_from_an_outside_producer_parses(env: pytest.MonkeyPatch) -> None:
    from worker.message import parse_job

    job = parse_job(raw_job(token=JWT))  # the backend may push the SDK's JWT, or any token
    assert job.token.get_secret_value() == JWT
    assert JWT not in json.dumps(job.wire())


def test_a_sealed_token_that_does_not_open_is_an_invalid_job(env: pytest.MonkeyPatch) -> None:
    from worker.message import InvalidJob, parse_job

    foreign = sealer_of(access_token="another-deployment").seal(USER_TOKEN)
    with pytest.raises(InvalidJob) as info:
        parse_job(raw_job(token=foreign))
    text = f"{info.value} {info.value!r} {info.value.args}"
    assert info.value.job_id == "seal-1"
    assert "SYNAPSE_BRIDGE_SEALING_KEY" in text
    assert USER_TOKEN not in text and foreign not in text


def test_a_sealed_token_with_no_key_configured_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not the job's fault: the worker is misconfigured (the message goes back)."""
    from worker.message import parse_job

    sealed = sealer_of(access_token=SERVICE).seal(USER_TOKEN)
    monkeypatch.delenv("SYNAPSE_BRIDGE_SEALING_KEY", raising=False)
    monkeypatch.delenv("SYNAPSE_ACCESS_TOKEN", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match="SYNAPSE_BRIDGE_SEALING_KEY"):
            parse_job(raw_job(token=sealed))
        # A plain token needs no key to parse.
        assert parse_job(raw_job()).token.get_secret_value() == USER_TOKEN
    finally:
        get_settings.cache_clear()


# --------------------------------------------------------------------------- redaction


def test_redacted_copy_has_no_token_in_any_field(env: pytest.MonkeyPatch) -> None:
    from worker.message import REDACTED, parse_job, redacted

    wire = parse_job(raw_job()).wire()
    body = {
        **wire,
        "json": {
            "inputs": [[1.0]],
            "note": f"Bearer {USER_TOKEN}",
            "nested": [{"api_key": USER_TOKEN}, {"jwt_here": JWT}],
        },
    }
    out = redacted(body)
    text = json.dumps(out)
    assert out["token"] == REDACTED == "[redacted]"
    assert USER_TOKEN not in text and JWT not in text and wire["token"] not in text
    assert out["job_id"] == "seal-1" and out["json"]["inputs"] == [[1.0]]
    assert out["release"] == wire["release"]
    assert body["token"] == wire["token"]  # a copy: the original is untouched


def test_redacted_task_body_covers_kwargs_and_positional_args() -> None:
    from worker.message import redacted

    task_body = [
        [{"token": USER_TOKEN, "job_id": "x"}],
        {"job": raw_job(), "token": USER_TOKEN},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    out = redacted(task_body)
    assert USER_TOKEN not in json.dumps(out)
    assert out[1]["job"]["job_id"] == "seal-1" and out[2] == task_body[2]
    assert redacted("not a dict") == "not a dict" and redacted(None) is None


def test_safe_kwargsrepr_never_shows_a_token(env: pytest.MonkeyPatch) -> None:
    from worker.message import parse_job, safe_kwargsrepr

    wire = parse_job(raw_job()).wire()
    for kwargs in ({"job": wire}, {"job": raw_job()}, {"job": "x", "token": USER_TOKEN}, None):
        shown = safe_kwargsrepr(kwargs)
        assert USER_TOKEN not in shown and wire["token"] not in shown
