"""structlog, set up once per process: JSON for machines, console for people.

A redaction processor runs last before rendering, so no token, JWT or secret
reaches a log line whatever a caller binds.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog

REDACTED = "[REDACTED]"

# Keys whose values are secrets wherever they appear.
SECRET_KEYS = re.compile(
    r"(^|_)(token|jwt|secret|password|passwd|api_key|apikey|authorization|signing_key|"
    r"access_token|serve_multiplexed_model_id|credentials?)$",
    re.IGNORECASE,
)
# A JWT anywhere in a string: three base64url segments, the first a JSON header.
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}")
# "Token abc", "Bearer abc" as in auth headers.
AUTH_RE = re.compile(r"\b(Token|Bearer|TOKEN|BEARER|bearer)\s+[A-Za-z0-9._~+/=-]{6,}")
# Passwords inside URLs: scheme://user:password@host
# Each pattern that starts with a repeat is anchored where a word starts: scanning a
# long run of letters stays linear (unanchored, every position retried the run).
URL_PASSWORD_RE = re.compile(
    r"(?P<pre>(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?P<at>@)"
)
# key=value / "key": "value" forms for secret-looking keys inside free text.
KV_RE = re.compile(
    r"""(?P<k>["']?(?<![a-z0-9_])(?:[a-z_]*token|jwt|secret|password|api_key|authorization)"""
    r"""["']?\s*[:=]\s*)"""
    r"""(?P<q>["']?)(?P<v>[^"'\s,}&]{4,})""",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """Mask JWTs, auth header values and secret-looking key=value pairs in free text."""
    text = JWT_RE.sub(REDACTED, text)
    text = AUTH_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = URL_PASSWORD_RE.sub(lambda m: f"{m.group('pre')}{REDACTED}{m.group('at')}", text)
    return KV_RE.sub(lambda m: f"{m.group('k')}{m.group('q')}{REDACTED}", text)


def redact(value: Any, key: str | None = None, _depth: int = 0) -> Any:
    """Redact a value recursively: secret keys are masked whole, strings are scanned."""
    if key is not None and SECRET_KEYS.search(key) and value not in (None, ""):
        return REDACTED
    if _depth > 8:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact(v, str(k), _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v, None, _depth + 1) for v in value)
    if isinstance(value, BaseException):
        return redact_text(repr(value))
    return value


def redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: redact(v, k) for k, v in event_dict.items()}


_configured = False


def configure_logging(fmt: str = "console", level: str = "INFO", *, force: bool = False) -> None:
    """Configure structlog and the stdlib root logger once (idempotent unless forced).

    Both structlog and stdlib records (celery, httpx, uvicorn) end in one handler, so
    lines from many threads never interleave, and one chain redacts them all.
    """
    global _configured
    if _configured and not force:
        return
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # Render exc_info to text first, so the traceback is redacted too.
                structlog.processors.format_exc_info,
                redact_processor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A job's line is the worker's "job finished"; Celery's "received" and "succeeded"
    # lines say it again, twice per job. They come back with the DEBUG level.
    quiet = logging.WARNING if logging.getLevelName(level) > logging.DEBUG else logging.NOTSET
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(quiet)
    _configured = True
