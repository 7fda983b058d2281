"""The character set of ids that go into backend URL paths and model keys.

A job, model, tenant or version id is put into a URL path (``jobs/{id}/``,
``models/{id}/``), a header (``Synapse-Tenant``) or a model key
(``tenant:model[:version]``) as it comes. An id outside this set could change the
request (``..`` and ``.`` are normalized away by httpx, ``/`` adds a segment, ``?``
and ``#`` end the path, ``%`` is decoded by the server, ``:`` splits a model key,
CR/LF split a header), so every id is checked against it before use:

* all ids: ASCII letters and digits first, then letters, digits, ``_``, ``.``, ``-``;
  so never ``/``, ``%``, ``?``, ``#``, a space or a control character, and never a
  dot segment (``.`` or ``..``): the first character is a letter or digit;
* model id and version: an int >= 0, or such a string of 1 to 128 characters;
* tenant code: such a string of 1 to 100 characters;
* job id: 1 to 128 characters, and ``:`` is allowed too (a job id is never part of
  a model key).

Matching is ASCII only (no look-alike letters) and over the whole value (a trailing
newline does not pass, as it would with ``$``).
"""

from __future__ import annotations

import re
from typing import Any

from config.logging import redact_text

# The patterns as strings, for pydantic ``Field(pattern=...)`` (whole-value match there).
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
VERSION_PATTERN = MODEL_ID_PATTERN

JOB_ID_RE = re.compile(JOB_ID_PATTERN.strip("^$"))
MODEL_ID_RE = re.compile(MODEL_ID_PATTERN.strip("^$"))
TENANT_RE = re.compile(TENANT_PATTERN.strip("^$"))
VERSION_RE = MODEL_ID_RE

_QUOTE_MAX = 40  # characters of a refused value quoted in an error, at most

_ALLOWED = "letters, digits, '_', '.', '-' (ASCII), starting with a letter or digit"


class InvalidId(ValueError):
    """An id outside the documented character set; ``field`` names which id."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.allowed = allowed
        super().__init__(f"invalid {field} {quoted(value)}: allowed are {allowed}")

    def unquoted(self) -> str:
        """The message without the value, where no field's value may be quoted."""
        return f"invalid {self.field}: allowed are {self.allowed}"


def quoted(value: Any) -> str:
    """``repr`` of a value, cut to a few dozen characters (never echo huge input), with
    anything secret-looking (a JWT, ``Bearer ...``) masked."""
    text = redact_text(repr(value)[:4096])  # masked whole, before it is cut
    if len(text) > _QUOTE_MAX:
        return f"{text[:_QUOTE_MAX]}... ({len(str(value))} chars)"
    return text


def _check_str(field: str, value: Any, pattern: re.Pattern[str], allowed: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidId(field, value, allowed)
    return value


def _check_int_or_str(field: str, value: Any, pattern: re.Pattern[str], allowed: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidId(field, value, f"an int >= 0, or {allowed}")
        return str(value)
    return _check_str(field, value, pattern, f"an int >= 0, or {allowed}")


def check_job_id(value: Any, field: str = "job id") -> str:
    """``value`` if it is a job id, else ``InvalidId``."""
    return _check_str(field, value, JOB_ID_RE, f"{_ALLOWED} and ':', 1-128 chars")


def check_model_id(value: Any, field: str = "model id") -> str:
    """The model id as a string, if ``value`` is one (an int >= 0 or a string)."""
    return _check_int_or_str(field, value, MODEL_ID_RE, f"{_ALLOWED}, 1-128 chars")


def check_version(value: Any, field: str = "version") -> str:
    """The version as a string, if ``value`` is one (same set as a model id)."""
    return _check_int_or_str(field, value, VERSION_RE, f"{_ALLOWED}, 1-128 chars")


def check_tenant(value: Any, field: str = "tenant") -> str:
    """``value`` if it is a tenant code, else ``InvalidId``."""
    return _check_str(field, value, TENANT_RE, f"{_ALLOWED}, 1-100 chars")
