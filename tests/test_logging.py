"""Unit tests for config/logging.py: redaction, and what reaches stderr once configured."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

import config.logging as cfg_logging
from config.logging import REDACTED, configure_logging, redact, redact_processor, redact_text

USER_TOKEN = "tok-alice-0123456789-secret"
# A real-looking JWT (the SDK's multiplexing token shape).
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJtb2RlbCI6IjEyIiwidG9rZW4iOiJ0b2stYWxpY2UifQ"
    ".c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
)


# --------------------------------------------------------------------------- redact()


class TestRedactKeys:
    @pytest.mark.parametrize(
        "key",
        [
            "token",
            "access_token",
            "user_token",
            "authorization",
            "Authorization",
            "password",
            "jwt",
            "secret",
            "signing_key",
            "api_key",
            "serve_multiplexed_model_id",
            "credentials",
        ],
    )
    def test_secret_keys_masked(self, key: str) -> None:
        assert redact({key: "some-opaque-value-1234"}) == {key: REDACTED}

    def test_non_string_secret_masked(self) -> None:
        assert redact({"token": 123456789}) == {"token": REDACTED}

    def test_empty_and_none_left_as_is(self) -> None:
        # Nothing to hide; keeps "token: None" readable when debugging.
        assert redact({"token": None, "password": ""}) == {"token": None, "password": ""}

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("job_id", "job-42"),
            ("model", "12"),
            ("model_id", 12),
            ("tenant", "acme"),
            ("tenant_name", "globex"),
            ("status", "SUCCEEDED"),
            ("route_prefix", "/0418f44ba59825af7d9aba77c228b487"),
            ("model_key", "acme:12:3"),
            ("token_count", 5),  # a number of tokens is not a token
            ("progress", 0.5),
        ],
    )
    def test_ordinary_values_untouched(self, key: str, value: object) -> None:
        assert redact({key: value}) == {key: value}

    def test_nested(self) -> None:
        data = {
            "job_id": "job-1",
            "request": {
                "headers": {"Authorization": f"Token {USER_TOKEN}", "Synapse-Tenant": "acme"},
                "params": [{"model": 12, "token": USER_TOKEN}, ("x", {"jwt": JWT})],
            },
        }
        out = redact(data)
        assert out["job_id"] == "job-1"
        assert out["request"]["headers"]["Authorization"] == REDACTED
        assert out["request"]["headers"]["Synapse-Tenant"] == "acme"
        assert out["request"]["params"][0] == {"model": 12, "token": REDACTED}
        assert out["request"]["params"][1] == ("x", {"jwt": REDACTED})
        assert isinstance(out["request"]["params"][1], tuple)
        assert USER_TOKEN not in repr(out)
        assert JWT not in repr(out)
        # the input is not mutated
        assert data["request"]["params"][0]["token"] == USER_TOKEN  # type: ignore[index]

    def test_whole_subtree_under_secret_key(self) -> None:
        assert redact({"credentials": {"user": "a", "pw": "b"}}) == {"credentials": REDACTED}

    def test_exception_value_scanned(self) -> None:
        out = redact({"error": RuntimeError(f"call failed: Bearer {USER_TOKEN}")})
        assert isinstance(out["error"], str)
        assert "RuntimeError" in out["error"]
        assert USER_TOKEN not in out["error"]

    def test_plain_scalars(self) -> None:
        assert redact(42) == 42
        assert redact(None) is None
        assert redact("job 42 done") == "job 42 done"


class TestRedactText:
    def test_jwt_in_free_text(self) -> None:
        out = redact_text(f"calling serve with model token {JWT} for job 7")
        assert JWT not in out
        assert "eyJ" not in out
        assert REDACTED in out
        assert out.endswith("for job 7")

    @pytest.mark.parametrize("scheme", ["Token", "Bearer", "bearer"])
    def test_auth_header_values(self, scheme: str) -> None:
        out = redact_text(f"GET /models/12/ Authorization: {scheme} {USER_TOKEN} -> 403")
        assert USER_TOKEN not in out
        assert out.endswith("-> 403")

    @pytest.mark.parametrize(
        "text",
        [
            f"token={USER_TOKEN}",
            f"url=http://h/?access_token={USER_TOKEN}&x=1",
            f'{{"token": "{USER_TOKEN}"}}',
            f"password: {USER_TOKEN}",
            f"secret='{USER_TOKEN}'",
        ],
    )
    def test_key_value_in_text(self, text: str) -> None:
        out = redact_text(text)
        assert USER_TOKEN not in out
        assert REDACTED in out

    def test_ordinary_text_untouched(self) -> None:
        text = "job job-42 for model 12 of tenant acme finished in 1.5s (status SUCCEEDED)"
        assert redact_text(text) == text

    def test_processor_redacts_event_and_fields(self) -> None:
        ed = {"event": f"sent Bearer {USER_TOKEN}", "job_id": "j1", "token": USER_TOKEN}
        out = redact_processor(None, "info", ed)
        assert out["job_id"] == "j1"
        assert out["token"] == REDACTED
        assert USER_TOKEN not in out["event"]


# --------------------------------------------------------------------------- configured output


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging changes process-wide state; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    monkeypatch.setattr(cfg_logging, "_configured", False)
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_logging")
class TestConfiguredLogging:
    def test_structlog_json_line_is_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(fmt="json", force=True)
        log = structlog.get_logger("bridge.test")
        log.info(
            f"calling serve with {JWT}",
            job_id="job-42",
            model=12,
            tenant="acme",
            token=USER_TOKEN,
            headers={"serve_multiplexed_model_id": JWT},
            note=f"Authorization: Token {USER_TOKEN}",
        )
        err = capsys.readouterr().err
        assert USER_TOKEN not in err
        assert JWT not in err
        lines = json_lines(err)
        assert len(lines) == 1
        line = lines[0]
        assert line["event"] == f"calling serve with {REDACTED}"
        assert line["level"] == "info"
        assert line["job_id"] == "job-42"
        assert line["model"] == 12
        assert line["tenant"] == "acme"
        assert line["token"] == REDACTED
        assert line["headers"] == {"serve_multiplexed_model_id": REDACTED}
        assert "timestamp" in line

    def test_bound_context_is_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(fmt="json", force=True)
        structlog.get_logger().bind(access_token=USER_TOKEN, job_id="j").warning("bound")
        (line,) = json_lines(capsys.readouterr().err)
        assert line["access_token"] == REDACTED
        assert line["job_id"] == "j"

    def test_structlog_exception_is_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(fmt="json", force=True)
        try:
            raise RuntimeError(f"backend said no to Bearer {USER_TOKEN}")
        except RuntimeError:
            structlog.get_logger().exception("fetch failed")
        err = capsys.readouterr().err
        assert USER_TOKEN not in err
        (line,) = json_lines(err)
        assert "RuntimeError" in str(line["exception"])

    def test_level_filter(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(fmt="json", level="WARNING", force=True)
        structlog.get_logger().info("quiet", job_id="j")
        structlog.get_logger().warning("loud", job_id="j")
        assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["loud"]

    def test_stdlib_logging_is_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(fmt="json", force=True)
        logging.getLogger("x").error("request failed: Authorization: Bearer %s", USER_TOKEN)
        logging.getLogger("x").warning("model token %s rejected", JWT)
        err = capsys.readouterr().err
        assert USER_TOKEN not in err
        assert JWT not in err
        lines = json_lines(err)
        assert [line["level"] for line in lines] == ["error", "warning"]
        assert str(lines[0]["event"]).startswith("request failed: Authorization: ")
        assert REDACTED in str(lines[0]["event"])
        assert REDACTED in str(lines[1]["event"])

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_stdlib_exception_traceback_is_redacted(
        self, capsys: pytest.CaptureFixture[str], fmt: str
    ) -> None:
        configure_logging(fmt=fmt, force=True)
        try:
            raise RuntimeError(f"backend said no to Bearer {USER_TOKEN}")
        except RuntimeError:
            logging.getLogger("celery").exception("task failed")
        err = capsys.readouterr().err
        assert "task failed" in err
        assert "RuntimeError" in err  # the traceback is still there, only masked
        assert USER_TOKEN not in err

    def test_console_format_is_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(fmt="console", force=True)
        structlog.get_logger().info(f"with {JWT}", token=USER_TOKEN, job_id="job-9")
        err = capsys.readouterr().err
        assert "job-9" in err
        assert USER_TOKEN not in err
        assert JWT not in err

    def test_idempotent_unless_forced(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(fmt="json", force=True)
        configure_logging(fmt="console")  # ignored: already configured
        structlog.get_logger().info("still json")
        (line,) = json_lines(capsys.readouterr().err)
        assert line["event"] == "still json"
        assert len(logging.getLogger().handlers) == 1
