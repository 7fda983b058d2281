"""Fault injection, switched at run time, as a pure ASGI middleware.

A rule matches requests by path prefix (relative to the base URL, e.g. ``"jobs/"``) and
method, and can add latency, answer 503 (``outage``), answer an error status for a share
of requests (``error_rate``), drop the connection for a share (``drop_rate``), serve a
share but answer their 2xx with a body that is not JSON (``non_json_rate``), or refuse
bodies over a size with 413 (``max_body_bytes``), or answer 302 to another URL
(``redirect_to``: a client that follows it takes its headers there). The
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

``non_json_rate``: the request is served as usual (a PATCH is applied and logged), then
its answer, when the app's status is 2xx, keeps that status but its body is replaced by
a short HTML page (``text/html``), as a misconfigured proxy would; a non-2xx answer passes
unchanged. ``max_body_bytes``: the body is read (and counted) before the app sees it; over
the limit the answer is 413 ``{"detail": "...", "size": n, "limit": m}`` and the app
never runs; otherwise the buffered body is handed on unchanged. Both are marked with
the ``Synapse-Fault`` header (``non-json``, ``too-large``).

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
NON_JSON_BODY = b"<html><body><h1>OK</h1></body></html>\n"


class FaultRule(BaseModel):
    """One rule. Every matching rule adds its latency and its ``max_body_bytes`` (the
    smallest applies); the first rule that decides an outcome (outage, drop, error,
    non_json, rolled in that order within a rule) wins."""

    model_config = ConfigDict(extra="forbid")

    path_prefix: str = Field("", description="e.g. 'jobs/' or 'models/'; '' matches all")
    methods: list[str] | None = Field(None, description="e.g. ['PATCH']; null: any method")
    latency_ms: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    error_status: int = Field(500, ge=400, le=599)
    drop_rate: float = Field(0.0, ge=0, le=1)
    outage: bool = False
    non_json_rate: float = Field(
        0.0, ge=0, le=1, description="share served, with a 2xx answer body that is not JSON"
    )
    max_body_bytes: int | None = Field(
        None, ge=0, description="request bodies over this many bytes answer 413"
    )
    limit: int | None = Field(None, ge=1, description="apply to the first N matches only")
    redirect_to: str | None = Field(None, description="answer 302 with this Location")

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
    outcome: str | None = None  # None | "outage" | "redirect" | "drop" | "error" | "non_json"
    status: int = 200
    location: str | None = None
    max_body_bytes: int | None = None


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
            if rule.max_body_bytes is not None and (
                d.max_body_bytes is None or rule.max_body_bytes < d.max_body_bytes
            ):
                d.max_body_bytes = rule.max_body_bytes
            if d.outcome is not None:
                continue
            if rule.outage:
                d.outcome, d.status = "outage", 503
            elif rule.redirect_to:
                d.outcome, d.status, d.location = "redirect", 302, rule.redirect_to
            elif rule.drop_rate and self.rng.random() < rule.drop_rate:
                d.outcome = "drop"
            elif rule.error_rate and self.rng.random() < rule.error_rate:
                d.outcome, d.status = "error", rule.error_status
            elif rule.non_json_rate and self.rng.random() < rule.non_json_rate:
                d.outcome = "non_json"
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
        if d.outcome in (None, "non_json"):
            if d.max_body_bytes is not None:
                size, receive = await _read_body(receive)
                if size > d.max_body_bytes:
                    detail = f"Request body is {size} bytes; the limit is {d.max_body_bytes} bytes."
                    body = {"detail": detail, "size": size, "limit": d.max_body_bytes}
                    await _answer(send, 413, body, b"too-large")
                    return
            if d.outcome == "non_json":
                send = _non_json_send(send)
            await self.app(scope, receive, send)
        elif d.outcome == "drop":
            await _drop(receive, send)
        else:
            detail = (
                "Service unavailable (injected outage)"
                if d.outcome == "outage"
                else (f"Injected fault: {d.status}")
            )
            extra = [(b"retry-after", b"1")] if d.outcome == "outage" else []
            if d.location is not None:
                detail = "Found (injected redirect)"
                extra = [(b"location", d.location.encode("latin-1"))]
            await _answer(send, d.status, {"detail": detail}, d.outcome.encode(), extra)


async def _answer(
    send: Any,
    status: int,
    content: dict[str, Any],
    fault: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole JSON answer, marked with the fault header."""
    body = json.dumps(content).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (FAULT_HEADER, fault),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any) -> tuple[int, Any]:
    """Read the whole request body; its size and a ``receive`` that replays it (then
    hands on to the server's own, for the disconnect)."""
    chunks: list[bytes] = []
    replay: list[dict[str, Any]] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            replay.append(message)
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replay.insert(0, {"type": "http.request", "body": body, "more_body": False})

    async def replaying() -> dict[str, Any]:
        return replay.pop(0) if replay else await receive()

    return len(body), replaying


def _non_json_send(send: Any) -> Any:
    """``send`` that keeps a 2xx status but replaces the body with ``NON_JSON_BODY``."""
    garble = False

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal garble
        if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
            garble = True
            skip = (b"content-type", b"content-length")
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in skip]
            headers += [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(NON_JSON_BODY)).encode()),
                (FAULT_HEADER, b"non-json"),
            ]
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and garble:
            if message.get("more_body", False):
                return  # the app's body is dropped; ours goes with its last part
            message = {"type": "http.response.body", "body": NON_JSON_BODY}
        await send(message)

    return wrapped


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
