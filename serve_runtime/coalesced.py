"""Coalesced calls: many jobs' items in one HTTP request to a serve endpoint.

Each request through Serve's proxy costs ~11 ms of CPU on the serving path whatever
it carries, so the worker sends the queued jobs of one model as one call. The wire:

* request: ``POST {route_prefix}/`` with the header ``synapse-items: <n>``, the
  multiplexing headers of a single call (for routing), and the body
  ``{"callers": [<model JWT>, ...], "items": [{"caller": <index>, "body": <json>}, ...]}``:
  each item is what a single call would send, on behalf of its own caller, so jobs of
  many users of one model share a call and each is still authorized as its own;
* answer: ``200 {"items": [{"status": <int>, "body": <json>}, ...]}``, in order: each
  item answered exactly as a single call with that body would have been (an error, a
  deferred ticket, a result);
* a malformed call (a count that does not match, over ``MAX_ITEMS``, an item naming
  no caller) is a ``400`` with code ``invalid_items``.

On the replica, ``CoalescedCalls`` (ASGI middleware on every plugin's app) runs each
item through the plugin's own endpoint, concurrently, so authorization, validation,
deferral and ``predict`` are the plugin's as for a single call, and ``predict`` hands
the call's items to the ``DeviceBatcher`` as one batch (``ARRIVALS``). A plugin needs
no change; a single body works as before.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from config.settings import MAX_COALESCED_ITEMS as MAX_ITEMS
from serve_runtime.batcher import Arrivals
from serve_runtime.tokens import AFFINE_TOKEN_HEADER, MODEL_TOKEN_HEADER, looks_like_jwt

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

ITEMS_HEADER = "synapse-items"
INVALID_ITEMS = "invalid_items"  # the error code of a malformed coalesced call

# The coalesced call the current item belongs to (None for a single call).
ARRIVALS: contextvars.ContextVar[Arrivals | None] = contextvars.ContextVar(
    "synapse_coalesced_arrivals", default=None
)
# Whether the current item has been handed to the batcher (then ``arrived()`` is said).
_ANNOUNCED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "synapse_coalesced_announced", default=None
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def arrivals_for_batcher() -> Arrivals | None:
    """The current item's call, for ``DeviceBatcher.submit``; marks the item arrived.

    Called once by ``predict`` right before it queues the item.
    """
    arrivals, announced = ARRIVALS.get(), _ANNOUNCED.get()
    if arrivals is None or announced is None or announced[0]:
        return None
    announced[0] = True
    arrivals.arrived()
    return arrivals


def encode_items(callers: list[str], caller_of: list[int], bodies: list[Any]) -> bytes:
    """The body of a coalesced call: item ``i`` is ``bodies[i]`` for ``callers[caller_of[i]]``."""
    items = [{"caller": c, "body": b} for c, b in zip(caller_of, bodies, strict=True)]
    return json.dumps({"callers": callers, "items": items}, separators=(",", ":")).encode()


class CoalescedCalls:
    """Pure ASGI middleware: a request with ``synapse-items`` runs as one request per
    item through the rest of the app; everything else passes through untouched."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        count = next((v for k, v in scope["headers"] if k == ITEMS_HEADER.encode()), None)
        if count is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            items = _parse(count, body)
        except ValueError as e:
            detail = {"message": str(e), "code": INVALID_ITEMS, "transient": False}
            await _respond(send, 400, json.dumps({"detail": detail}).encode())
            return
        arrivals = Arrivals(len(items))
        token_header = _token_header(scope)
        answers = await asyncio.gather(
            *(self._one(scope, token_header, item, arrivals) for item in items),
            return_exceptions=True,
        )
        parts = []
        for answer in answers:
            if isinstance(answer, BaseException):  # the app itself broke: a bare 500
                answer = (500, json.dumps({"detail": type(answer).__name__}).encode())
            status, payload = answer
            parts.append(b'{"status":%d,"body":%s}' % (status, payload))
        await _respond(send, 200, b'{"items":[' + b",".join(parts) + b"]}")

    async def _one(
        self, scope: Scope, token_header: bytes, item: tuple[bytes, bytes], arrivals: Arrivals
    ) -> tuple[int, bytes]:
        """One item through the app, as a request of its own, with its own caller's
        model token; (status, JSON payload)."""
        caller, body = item
        headers = [
            (k, v)
            for k, v in scope["headers"]
            if k not in (ITEMS_HEADER.encode(), b"content-length", token_header)
        ]
        headers.append((token_header, caller))
        headers.append((b"content-length", str(len(body)).encode()))
        sub_scope = {**scope, "headers": headers}
        sent_body = False
        response: dict[str, Any] = {"status": 500, "chunks": [], "json": False}
        never = asyncio.Event()

        async def sub_receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the item has no disconnect of its own
            return {"type": "http.disconnect"}

        async def sub_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                ctype = next(
                    (v for k, v in message.get("headers", []) if k == b"content-type"), b""
                )
                response["json"] = ctype.startswith(b"application/json")
            elif message["type"] == "http.response.body":
                response["chunks"].append(message.get("body", b""))

        announced = [False]
        ARRIVALS.set(arrivals)
        _ANNOUNCED.set(announced)
        try:
            await self.app(sub_scope, sub_receive, sub_send)
        finally:
            if not announced[0]:  # never reached the batcher: the others need not wait
                announced[0] = True
                arrivals.arrived()
        payload = b"".join(response["chunks"])
        if not response["json"]:
            payload = json.dumps(payload.decode("utf-8", "replace")).encode()
        elif not payload:
            payload = b"null"
        return response["status"], payload


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _token_header(scope: Scope) -> bytes:
    """Where a caller's model token travels: the multiplexing header itself in the
    compatible mode (it is the JWT), its own header in the model-affine mode."""
    mux = next((v for k, v in scope["headers"] if k == MODEL_TOKEN_HEADER.encode()), b"")
    if looks_like_jwt(mux.decode("latin-1")):
        return MODEL_TOKEN_HEADER.encode()
    return AFFINE_TOKEN_HEADER.encode()


def _parse(count: bytes, body: bytes) -> list[tuple[bytes, bytes]]:
    """A coalesced call's items: (the caller's model token, the item's JSON body)."""
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"{ITEMS_HEADER} must be a number of items") from None
    if not 1 <= n <= MAX_ITEMS:
        raise ValueError(f"{ITEMS_HEADER} must be 1 to {MAX_ITEMS}, not {n}")
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError("a coalesced call's body must be JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"a coalesced call's body must be an object, not {type(data).__name__}")
    callers, items = data.get("callers"), data.get("items")
    if not isinstance(callers, list) or not 1 <= len(callers) <= n:
        raise ValueError(f"callers must be a list of 1 to {n} model tokens")
    if not all(isinstance(c, str) and len(c) <= 8192 and _JWT.fullmatch(c) for c in callers):
        raise ValueError("each of callers must be a model token (a JWT)")
    if not isinstance(items, list) or len(items) != n:
        got = f"{len(items)} items" if isinstance(items, list) else "no list of items"
        raise ValueError(f"{ITEMS_HEADER} says {n} items; the body holds {got}")
    out = []
    for i, item in enumerate(items):
        caller = item.get("caller") if isinstance(item, dict) else None
        if (
            not isinstance(caller, int)
            or isinstance(caller, bool)
            or not 0 <= caller < len(callers)
        ):
            raise ValueError(f"item {i} names no caller (an index into callers)")
        out.append(
            (callers[caller].encode(), json.dumps(item.get("body"), separators=(",", ":")).encode())
        )
    return out


async def _respond(send: Send, status: int, payload: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


__all__ = [
    "ARRIVALS",
    "INVALID_ITEMS",
    "ITEMS_HEADER",
    "MAX_ITEMS",
    "CoalescedCalls",
    "arrivals_for_batcher",
    "encode_items",
]
