"""Fault injection, switched at run time, as a pure ASGI middleware.

A rule matches requests by path prefix (relative to the base URL, e.g. ``"jobs/"``) and
method, and can add latency, answer 503 (``outage``), answer an error status for a share
of requests (``error_rate``), or drop the connection for a share (``drop_rate``). The
``_admin/`` and ``health/`` paths are never faulted, so a test can always switch faults
off again. Latency is an ``asyncio.sleep`` in the middleware: it delays only the faulted
request, never the others.

How a drop works: uvicorn's ``send`` callable is a bound method of its per-request
``RequestResponseCycle``, whose ``transport`` is the client's socket. The middleware
aborts that transport before any byte of a response is written, so the client sees the
connection close with no HTTP response at all (httpx: ``RemoteProtocolError: Server
disconnected without sending a response``), as with a crashed proxy or a dropped
connection. This reaches into uvicorn (h11 and httptools alike); if the transport cannot
be found (another server, or uvicorn changed), the closest real behaviour is used
instead: a response head promising a body that never comes, then the server closes the
connection (the client sees an incomplete response).

Rules are kept in memory (a restart forgets them); they can also be given at start
(``serve --faults`` / ``SYNAPSE_BACKEND_FAULTS``: JSON text or a JSON/YAML file).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger("local_backend.faults")

EXEMPT_PREFIXES = ("_admin/", "_admin", "health/", "health")
FAULT_HEADER = b"synapse-fault"


class FaultRule(BaseModel):
    """One rule. Every matching rule adds its latency; the first rule that decides an
    outcome (outage, drop, error) wins."""

    model_config = ConfigDict(extra="forbid")

    path_prefix: str = Field("", description="e.g. 'jobs/' or 'models/'; '' matches all")
    methods: list[str] | None = Field(None, description="e.g. ['PATCH']; null: any method")
    latency_ms: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    error_status: int = Field(500, ge=400, le=599)
    drop_rate: float = Field(0.0, ge=0, le=1)
    outage: bool = False
    limit: int | None = Field(None, ge=1, description="apply to the first N matches only")

    @field_validator("path_prefix")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.lstrip("/")

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [m.upper() for m in v]

    def matches(self, method: str, path: str) -> bool:
        return path.startswith(self.path_prefix) and (
            self.methods is None or method.upper() in self.methods
        )


class FaultConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[FaultRule] = Field(default_factory=list)
    seed: int | None = None


def parse_faults(value: Any) -> FaultConfig:
    """Accept a list of rules, one rule, or ``{"rules": [...], "seed": n}``."""
    if value is None:
        return FaultConfig()
    if isinstance(value, FaultConfig):
        return value
    if isinstance(value, list):
        return FaultConfig(rules=value)  # type: ignore[arg-type]
    if isinstance(value, dict) and ("rules" in value or "seed" in value):
        return FaultConfig.model_validate(value)
    return FaultConfig(rules=[FaultRule.model_validate(value)])


def load_faults(text_or_path: str) -> FaultConfig:
    """Faults from JSON text, or from a JSON/YAML file path (env var / CLI option)."""
    text = text_or_path.strip()
    if text[:1] in ("[", "{"):
        return parse_faults(json.loads(text))
    import yaml

    return parse_faults(yaml.safe_load(Path(text).read_text()))


@dataclass
class Decision:
    latency_s: float = 0.0
    outcome: str | None = None  # None | "outage" | "drop" | "error"
    status: int = 200


class FaultState:
    """The current rules, their hit counts and the random source (seeded when asked)."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.set(config or FaultConfig())

    def set(self, config: FaultConfig) -> None:
        self.config = config
        self.hits = [0] * len(config.rules)
        self.rng = random.Random(config.seed)

    def clear(self) -> None:
        self.set(FaultConfig())

    def snapshot(self) -> dict[str, Any]:
        return {
            "rules": [
                {**r.model_dump(), "hits": h}
                for r, h in zip(self.config.rules, self.hits, strict=True)
            ],
            "seed": self.config.seed,
        }

    def decide(self, method: str, path: str) -> Decision:
        """Roll the dice for one request (``path`` without the leading slash)."""
        d = Decision()
        if path.startswith(EXEMPT_PREFIXES):
            return d
        for i, rule in enumerate(self.config.rules):
            if not rule.matches(method, path):
                continue
            if rule.limit is not None and self.hits[i] >= rule.limit:
                continue
            self.hits[i] += 1
            d.latency_s += rule.latency_ms / 1000.0
            if d.outcome is not None:
                continue
            if rule.outage:
                d.outcome, d.status = "outage", 503
            elif rule.drop_rate and self.rng.random() < rule.drop_rate:
                d.outcome = "drop"
            elif rule.error_rate and self.rng.random() < rule.error_rate:
                d.outcome, d.status = "error", rule.error_status
        return d


class FaultMiddleware:
    """Pure ASGI middleware; must wrap the app directly under the server so that ``send``
    is still the server's own (see the module docstring on drops)."""

    def __init__(self, app: Any, state: FaultState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "/")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        d = self.state.decide(scope["method"], path.lstrip("/"))
        if d.latency_s > 0:
            await asyncio.sleep(d.latency_s)
        if d.outcome is None:
            await self.app(scope, receive, send)
        elif d.outcome == "drop":
            await _drop(receive, send)
        else:
            detail = (
                "Service unavailable (injected outage)"
                if d.outcome == "outage"
                else (f"Injected fault: {d.status}")
            )
            body = json.dumps({"detail": detail}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (FAULT_HEADER, d.outcome.encode()),
            ]
            if d.outcome == "outage":
                headers.append((b"retry-after", b"1"))
            await send({"type": "http.response.start", "status": d.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def _find_transport(send: Any) -> Any:
    """The server's transport behind ``send``, or None. Duck-typed: uvloop's transports
    are not ``asyncio.BaseTransport`` subclasses."""
    owner = getattr(send, "__self__", None)
    transport = getattr(owner, "transport", None)
    return transport if callable(getattr(transport, "abort", None)) else None


async def _drop(receive: Any, send: Any) -> None:
    transport = _find_transport(send)
    if transport is None:
        log.warning("fault drop: server transport not reachable; sending a truncated response")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1048576"), (FAULT_HEADER, b"drop")],
            }
        )
        return  # the server closes the connection: the response never completes
    transport.abort()  # close the socket now, nothing written
    # Wait until the server has seen the disconnect, so it does not try to answer.
    try:
        async with asyncio.timeout(5):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        pass
