"""The task message: ``synapse.inference.run(job={...})``, validated with pydantic.

An invalid message is never retried: it is quarantined on ``inference.invalid`` and,
when a job id can be read from it, the job is marked FAILED with the validation error.
The user token is a secret: masked in reprs, never logged, never in a result.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    model_validator,
)

from config import prefix_for_release

TASK_NAME = "synapse.inference.run"
POLL_TASK_NAME = "synapse.inference.poll"
DEAD_LETTER_TASK_NAME = "synapse.inference.dead_letter"
QUEUE = "inference"
DLQ = "inference.dlq"
INVALID_QUEUE = "inference.invalid"

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


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
    tenant: str | None = Field(None, min_length=1, max_length=100)
    token: SecretStr = Field(..., min_length=1, max_length=4096)
    model: int | str
    method: Literal["post", "put", "get"] = "post"
    body: dict[str, Any] | list[Any] | None = Field(None, alias="json")
    items: list[dict[str, Any]] | None = Field(None, min_length=1)
    release: Release
    priority: int = Field(5, ge=0, le=9)
    deadline: datetime | None = None
    submitted_at: float | None = Field(None, description="unix time the job was queued")

    @model_validator(mode="after")
    def _one_payload(self) -> JobMessage:
        if (self.body is None) == (self.items is None):
            raise ValueError("give exactly one of 'json' (a single request) or 'items' (a batch)")
        if isinstance(self.model, str) and not self.model.strip():
            raise ValueError("model must be a non-empty id")
        return self

    @field_serializer("token", when_used="json")
    def _reveal_for_the_wire(self, token: SecretStr) -> str:
        return token.get_secret_value()

    @property
    def is_batch(self) -> bool:
        return self.items is not None

    def expired(self, now: float | None = None) -> bool:
        if self.deadline is None:
            return False
        deadline = self.deadline if self.deadline.tzinfo else self.deadline.replace(tzinfo=UTC)
        return (now or time.time()) > deadline.timestamp()

    def wire(self) -> dict[str, Any]:
        """The JSON-safe message body (token included: it goes to the broker only)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def safe_repr(self) -> str:
        return f"JobMessage(job_id={self.job_id!r}, tenant={self.tenant!r}, model={self.model!r})"


def readable_job_id(raw: Any) -> str | None:
    """Best effort: the job id of a message that did not validate."""
    job_id = raw.get("job_id") if isinstance(raw, dict) else None
    if isinstance(job_id, str) and re.match(JOB_ID_PATTERN, job_id):
        return job_id
    return None


def parse_job(
    raw: Any, *, max_items: int | None = None, max_bytes: int | None = None
) -> JobMessage:
    """Validate a message body; raises ``InvalidJob`` naming every bad field (never values)."""
    job_id = readable_job_id(raw)
    if not isinstance(raw, dict):
        raise InvalidJob(f"job must be a JSON object, got {type(raw).__name__}", job_id)
    if max_bytes is not None:
        size = len(json.dumps(raw, default=str))
        if size > max_bytes:
            raise InvalidJob(f"job message is {size} bytes, over the {max_bytes} limit", job_id)
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


def redacted(raw: Any) -> Any:
    """A copy of a message body for people (dead-letter and invalid queues): no token."""
    if not isinstance(raw, dict):
        return raw
    return {k: ("[redacted]" if k == "token" else v) for k, v in raw.items()}


def safe_kwargsrepr(kwargs: dict[str, Any] | None) -> str:
    """What events and Flower show of a task's kwargs: never the token."""
    job = (kwargs or {}).get("job")
    if isinstance(job, dict):
        return repr({"job": {k: job.get(k) for k in ("job_id", "model", "tenant")}})
    return "{...}"


FAIL_INVALID_TASK_NAME = "synapse.inference.fail_invalid"
