"""The task message: ``synapse.inference.run(job={...})``, validated with pydantic.

An invalid message is never retried: it is quarantined on ``inference.invalid`` and,
when a job id can be read from it, the job is marked FAILED with the validation error.
The user token is a secret: masked in reprs, never logged, never in a result. In
memory (``JobMessage.token``) it is plain, for the one call that needs it; in every
message we publish (``JobMessage.wire()``) it is sealed (``worker.sealing``); a plain
token from an outside producer parses too. ``redacted`` makes the copies people read
(dead-letter and invalid queues): no token at all, sealed or plain.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from config import prefix_for_release
from config.ids import JOB_ID_PATTERN, JOB_ID_RE, InvalidId, check_model_id, check_tenant
from config.logging import SECRET_KEYS, redact_text
from worker.sealing import Sealer, UnsealError, is_sealed
from worker.sealing import sealer as default_sealer

TASK_NAME = "synapse.inference.run"
POLL_TASK_NAME = "synapse.inference.poll"
DEAD_LETTER_TASK_NAME = "synapse.inference.dead_letter"
QUEUE = "inference"
DLQ = "inference.dlq"
INVALID_QUEUE = "inference.invalid"


class InvalidJob(ValueError):
    """The message cannot be processed; ``job_id`` is set when it could be read."""

    def __init__(self, message: str, job_id: str | None = None):
        super().__init__(message)
        self.job_id = job_id


class Release(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str | None = Field(None, min_length=1, max_length=200)
    version: str | None = Field(None, min_length=1, max_length=100)
    checksum: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,128}$")

    @model_validator(mode="after")
    def _named(self) -> Release:
        if not self.checksum and not self.code:
            raise ValueError("release needs a checksum or a code")
        return self

    @property
    def route_prefix(self) -> str:
        return prefix_for_release(self.checksum, self.code, self.version)


class JobMessage(BaseModel):
    """One inference job; exactly one of ``json`` (single) or ``items`` (batch)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    job_id: str = Field(..., pattern=JOB_ID_PATTERN)
    tenant: str | None = None
    token: SecretStr = Field(..., min_length=1, max_length=4096)
    model: int | str
    method: Literal["post", "put", "get"] = "post"
    body: dict[str, Any] | list[Any] | None = Field(None, alias="json")
    items: list[dict[str, Any]] | None = Field(None, min_length=1)
    release: Release
    priority: int = Field(5, ge=0, le=9)
    deadline: datetime | None = None
    submitted_at: float | None = Field(None, description="unix time the job was queued")
    # Poll state that must survive a resubmission (a new run message): how often the
    # job was submitted again after its deferred ticket was lost. None: never.
    resubmits: int | None = Field(None, ge=1, le=1000)

    @field_validator("model")
    @classmethod
    def _model_id(cls, v: int | str) -> int | str:
        if isinstance(v, str) and not v.strip():
            raise ValueError("model must be a non-empty id")
        try:
            check_model_id(v, "model id")  # it goes into the backend's models/{id}/ URL
        except InvalidId as e:
            raise ValueError(e.unquoted()) from None  # validation errors quote no value
        return v

    @field_validator("tenant")
    @classmethod
    def _tenant_code(cls, v: str | None) -> str | None:
        try:
            return None if v is None else check_tenant(v)  # a header and a model key
        except InvalidId as e:
            raise ValueError(e.unquoted()) from None

    @model_validator(mode="after")
    def _one_payload(self) -> JobMessage:
        if (self.body is None) == (self.items is None):
            raise ValueError("give exactly one of 'json' (a single request) or 'items' (a batch)")
        return self

    @property
    def is_batch(self) -> bool:
        return self.items is not None

    def expired(self, now: float | None = None) -> bool:
        if self.deadline is None:
            return False
        deadline = self.deadline if self.deadline.tzinfo else self.deadline.replace(tzinfo=UTC)
        return (now or time.time()) > deadline.timestamp()

    def wire(self, sealer: Sealer | None = None) -> dict[str, Any]:
        """The JSON-safe message body for the broker and the ledger: the token sealed.

        ``sealer`` defaults to the process's (``worker.sealing.sealer()``, from settings).
        """
        out = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["token"] = (sealer or default_sealer()).seal(self.token.get_secret_value())
        return out

    def safe_repr(self) -> str:
        return f"JobMessage(job_id={self.job_id!r}, tenant={self.tenant!r}, model={self.model!r})"


def readable_job_id(raw: Any) -> str | None:
    """Best effort: the job id of a message that did not validate."""
    job_id = raw.get("job_id") if isinstance(raw, dict) else None
    if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id):
        return job_id
    return None


def parse_job(
    raw: Any,
    *,
    max_items: int | None = None,
    max_bytes: int | None = None,
    sealer: Sealer | None = None,
) -> JobMessage:
    """Validate a message body; raises ``InvalidJob`` naming every bad field (never values).

    A sealed token is opened (with ``sealer``, default the process's): one that does
    not open is an ``InvalidJob``; no key configured at all is a ``SettingsError`` (the
    worker is misconfigured, the message is not at fault). A plain token is kept.
    """
    job_id = readable_job_id(raw)
    if not isinstance(raw, dict):
        raise InvalidJob(f"job must be a JSON object, got {type(raw).__name__}", job_id)
    if max_bytes is not None:
        size = len(json.dumps(raw, default=str))
        if size > max_bytes:
            raise InvalidJob(f"job message is {size} bytes, over the {max_bytes} limit", job_id)
    token = raw.get("token")
    if is_sealed(token):
        try:
            raw = {**raw, "token": (sealer or default_sealer()).open(token)}
        except UnsealError as e:
            raise InvalidJob(str(e), job_id) from None
    try:
        job = JobMessage.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'job'}: {err['msg']}" for err in e.errors()
        )
        raise InvalidJob(f"invalid job message: {problems}", job_id) from None
    if max_items is not None and job.items is not None and len(job.items) > max_items:
        raise InvalidJob(f"batch has {len(job.items)} items, over the {max_items} limit", job_id)
    return job


REDACTED = "[redacted]"
_MAX_DEPTH = 64


def redacted(raw: Any) -> Any:
    """A copy of a message (a job, or a whole task body) for people: the dead-letter and
    invalid queues. Every token field (``token`` and any key config.logging treats as a
    secret) and every string that is a sealed token or that config.logging's redaction
    recognizes (a JWT, ``Bearer ...``, ``token=...``) becomes ``"[redacted]"``; the rest
    is kept. A plain token in a field of no secret name that looks like nothing in
    particular cannot be recognized."""
    return _redacted(raw, None, 0)


def _redacted(value: Any, key: str | None, depth: int) -> Any:
    if key is not None and SECRET_KEYS.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return REDACTED if is_sealed(value) or redact_text(value) != value else value
    if isinstance(value, dict | list | tuple) and depth >= _MAX_DEPTH:
        return REDACTED  # too deep to look through: not kept
    if isinstance(value, dict):
        return {k: _redacted(v, str(k), depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, None, depth + 1) for v in value]
    return value


def safe_kwargsrepr(kwargs: dict[str, Any] | None) -> str:
    """What events, logs, inspect and Flower show of a task's kwargs: the job id, tenant
    and model, never the token (nor anything else a producer put there)."""
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    job = kwargs.get("job")
    if isinstance(job, dict):
        return repr({"job": {k: _shown(job.get(k)) for k in ("job_id", "model", "tenant")}})
    if isinstance(kwargs.get("job_id"), str):  # fail_invalid
        return repr({k: _shown(kwargs.get(k)) for k in ("job_id", "tenant")})
    return "{...}"


def _shown(value: Any) -> Any:
    """A job id, tenant or model as shown: short plain values only."""
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= 128):
        return redacted(value)
    return None if value is None else "[...]"


FAIL_INVALID_TASK_NAME = "synapse.inference.fail_invalid"
