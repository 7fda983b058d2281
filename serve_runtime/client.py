"""Calling a serve endpoint: one pooled keep-alive client per process, typed errors.

``ServeClient.infer`` returns the result, or ``Pending`` when the replica deferred it;
``ServeClient.poll`` asks again. ``call_and_wait`` polls until done, which is what the
SDK's blocking ``infer_remote`` promises its callers.
"""

from __future__ import annotations

import importlib
import threading
import time
from typing import Any

import httpx
import structlog

from config import Settings, get_settings
from config.errors import DeadlineExceeded
from serve_runtime.coalesced import ITEMS_HEADER, encode_items
from serve_runtime.deferred import POLL_KEY, Pending, is_envelope
from serve_runtime.errors import (
    TRANSIENT_STATUS,
    DeferredFailed,
    DeferredNotFound,
    ServeClientError,
    ServeConnectionError,
    ServeError,
    ServeRouteNotFound,
    ServeServerError,
    ServeTimeout,
    ServeTransientError,
)
from serve_runtime.http_pool import ShardedTransport
from serve_runtime.receipt import EXPECT_HEADER, ReceiptBackend, is_unacknowledged
from serve_runtime.shared_client import SharedClient
from serve_runtime.tokens import (
    AFFINE_TOKEN_HEADER,
    MODEL_TOKEN_HEADER,
    ModelKey,
    create_serve_multiplexed_model_id,
)

log = structlog.get_logger("serve_runtime.client")


# The transports other than Serve's proxy, by SYNAPSE_BRIDGE_SERVE_TRANSPORT: imported
# by name, as they need what the worker image leaves out (Ray).
TRANSPORTS = {"handle": "serve_runtime.handle_transport:HandleTransport"}
SERVE_EXTRA = "pip install 'synapse-serve-bridge[serve]'"


class TransportUnavailable(RuntimeError):
    """The configured serve transport cannot run here; the message names the setting."""


def transport_for(settings: Settings) -> httpx.BaseTransport | None:
    """The transport ``SYNAPSE_BRIDGE_SERVE_TRANSPORT`` names (None: Serve's proxy)."""
    if settings.serve_transport == "http":
        return None
    module, _, name = TRANSPORTS[settings.serve_transport].partition(":")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise TransportUnavailable(
            f"SYNAPSE_BRIDGE_SERVE_TRANSPORT={settings.serve_transport} needs the Python "
            f"package {e.name!r}, which is not installed here: {SERVE_EXTRA}"
        ) from None
    transport: httpx.BaseTransport = getattr(found, name)(settings)
    return transport


class ServeClient:
    """A thread-safe, pooled client for serve endpoints: HTTP through Serve's proxy, or
    the same requests through the transport ``SYNAPSE_BRIDGE_SERVE_TRANSPORT`` names."""

    def __init__(self, settings: Settings | None = None, *, base_url: str | None = None):
        self.settings = settings or get_settings()
        self.base_url = (base_url or self.settings.serve_url).rstrip("/")
        s = self.settings
        other = transport_for(s)
        # Where calls go, as errors name it.
        self.target = self.base_url if other is None else f"{s.serve_transport} transport"
        # Whether the proxy acknowledges requests, and how many went unacknowledged
        # (no proxy, no receipt: the other transports fail fast on their own).
        self.receipt = ReceiptBackend(s.serve_ack_timeout_s if other is None else 0.0)
        limits = httpx.Limits(
            max_connections=s.serve_max_connections,
            max_keepalive_connections=s.serve_max_connections,
        )
        self._http = SharedClient(
            timeout=httpx.Timeout(
                connect=s.serve_connect_timeout_s,
                read=s.serve_read_timeout_s,
                write=s.serve_read_timeout_s,
                pool=s.serve_connect_timeout_s,
            ),
            # One big httpcore pool costs O(connections^2) per request: shards. Their
            # connections report whether the proxy acknowledged each request.
            transport=other or ShardedTransport(limits, network_backend=self.receipt),
        )

    def close(self) -> None:
        self._http.close()

    # -- headers

    def model_headers(
        self,
        *,
        model: int | str,
        token: str,
        tenant: str | None,
        version: str | None = None,
        backend_url: str | None = None,
    ) -> dict[str, str]:
        """The multiplexing headers for one call, in the configured routing mode."""
        jwt_token = self.model_token(
            model=model, token=token, tenant=tenant, backend_url=backend_url
        )
        return self._routing_headers(jwt_token, model=model, tenant=tenant, version=version)

    def _routing_headers(
        self, jwt_token: str, *, model: int | str, tenant: str | None, version: str | None
    ) -> dict[str, str]:
        if self.settings.routing_mode == "model_affine":
            key = ModelKey(tenant=tenant, model=str(model), version=version)
            return {MODEL_TOKEN_HEADER: str(key), AFFINE_TOKEN_HEADER: jwt_token}
        return {MODEL_TOKEN_HEADER: jwt_token}

    def model_token(
        self, *, model: int | str, token: str, tenant: str | None, backend_url: str | None = None
    ) -> str:
        """The SDK's model JWT for one caller (``create_serve_multiplexed_model_id``)."""
        s = self.settings
        return create_serve_multiplexed_model_id(
            model,
            token,
            backend_url or s.require_backend_url(),
            tenant,
            signing_key=s.signing_key.get_secret_value() if s.signing_key else None,
            ttl_s=s.token_ttl_s,
        )

    # -- calls

    def infer(
        self,
        route_prefix: str,
        body: Any,
        *,
        model: int | str,
        token: str,
        tenant: str | None = None,
        version: str | None = None,
        method: str = "post",
        backend_url: str | None = None,
        deadline: float | None = None,
    ) -> Any:
        """One call; returns the result or ``Pending``; raises a ``ServeError``.

        ``deadline`` (a ``time.monotonic()`` instant) bounds the call: past it,
        ``DeadlineExceeded`` is raised instead of a transient timeout.
        """
        headers = self.model_headers(
            model=model, token=token, tenant=tenant, version=version, backend_url=backend_url
        )
        return self._request(method, route_prefix, body, headers, deadline)

    def infer_many(
        self,
        route_prefix: str,
        bodies: list[Any],
        *,
        model: int | str,
        tokens: list[str],
        tenant: str | None = None,
        version: str | None = None,
        backend_url: str | None = None,
        deadline: float | None = None,
    ) -> list[Any]:
        """One coalesced call (``serve_runtime.coalesced``): ``bodies[i]`` on behalf of
        the caller whose access token is ``tokens[i]``, all for one model.

        Returns, per body and in order, its result, ``Pending`` or the ``ServeError``
        it met; raises a ``ServeError`` when the call as a whole failed.
        """
        if len(tokens) != len(bodies):
            raise ValueError(f"{len(bodies)} bodies need {len(bodies)} tokens, not {len(tokens)}")
        callers: dict[str, int] = {}  # one model token per caller, not per item
        for token in tokens:
            callers.setdefault(token, len(callers))
        jwts = [
            self.model_token(model=model, token=t, tenant=tenant, backend_url=backend_url)
            for t in callers
        ]
        # Routed as the first caller's single call would be.
        headers = self._routing_headers(jwts[0], model=model, tenant=tenant, version=version)
        content = encode_items(jwts, [callers[t] for t in tokens], bodies)
        headers[ITEMS_HEADER] = str(len(bodies))
        headers["content-type"] = "application/json"
        data = self._request("post", route_prefix, None, headers, deadline, content=content)
        return parse_items(data, len(bodies), route_prefix)

    def poll(
        self,
        route_prefix: str,
        ticket: str,
        *,
        model: int | str,
        token: str,
        tenant: str | None = None,
        version: str | None = None,
        backend_url: str | None = None,
        deadline: float | None = None,
    ) -> Any:
        """Ask for a deferred result; returns it, or ``Pending`` while not ready."""
        headers = self.model_headers(
            model=model, token=token, tenant=tenant, version=version, backend_url=backend_url
        )
        return self._request("post", route_prefix, {POLL_KEY: ticket}, headers, deadline)

    def call_and_wait(
        self,
        route_prefix: str,
        body: Any,
        *,
        model: int | str,
        token: str,
        tenant: str | None = None,
        version: str | None = None,
        method: str = "post",
        wait_s: float | None = None,
        backend_url: str | None = None,
        deadline: float | None = None,
    ) -> Any:
        """Call and, when deferred, poll until the result is ready or ``wait_s`` passes.

        ``deadline`` bounds the whole wait too (``DeadlineExceeded`` past it).
        """
        kw: dict[str, Any] = {
            "model": model,
            "token": token,
            "tenant": tenant,
            "version": version,
            "backend_url": backend_url,
            "deadline": deadline,
        }
        result = self.infer(route_prefix, body, method=method, **kw)
        wait_until = None if wait_s is None else time.monotonic() + wait_s
        while isinstance(result, Pending):
            if wait_until is not None and time.monotonic() > wait_until:
                raise ServeTimeout(f"deferred result on {route_prefix} not ready in {wait_s}s")
            pause = self.settings.deferred_poll_interval_s
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            result = self.poll(route_prefix, result.ticket, **kw)
        return result

    def _request(
        self,
        method: str,
        route_prefix: str,
        body: Any,
        headers: dict[str, str],
        deadline: float | None = None,
        content: bytes | None = None,
    ) -> Any:
        url = f"{self.base_url}{route_prefix.rstrip('/')}/"
        extra: dict[str, Any] = {"content": content} if content is not None else {"json": body}
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"{method.upper()} {route_prefix}: no time left")
            s = self.settings
            extra["timeout"] = httpx.Timeout(
                connect=min(s.serve_connect_timeout_s, left),
                read=min(s.serve_read_timeout_s, left),
                write=min(s.serve_read_timeout_s, left),
                pool=min(s.serve_connect_timeout_s, left),
            )
        try:
            try:
                first = headers | EXPECT_HEADER if self.receipt.ack_timeout_s > 0 else headers
                response = self._http.request(method.upper(), url, headers=first, **extra)
            except httpx.ReadTimeout as e:
                if not is_unacknowledged(e):
                    raise
                # The proxy never read it (issue 13): its connection is closed; send it
                # again now, unbounded, so a busy proxy costs one bound at most.
                log.warning("serve_call_unacknowledged", route=route_prefix, detail=str(e))
                response = self._http.request(method.upper(), url, headers=headers, **extra)
        except httpx.TimeoutException as e:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"{method.upper()} {route_prefix}: no answer before the time limit"
                ) from None
            raise ServeTimeout(f"{method.upper()} {route_prefix}: {type(e).__name__}") from None
        except httpx.TransportError as e:
            raise ServeConnectionError(
                f"{method.upper()} {route_prefix}: cannot reach {self.target} ({type(e).__name__})"
            ) from None
        return parse_response(response, route_prefix)


_NOT_JSON = object()


def _error_detail(status: int, data: Any, text: str) -> tuple[str, dict[str, Any] | None]:
    """Our runtime answers errors as {"detail": {"message", "code", "transient"}}."""
    if data is _NOT_JSON:
        return text[:300], None
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, dict) and "code" in detail:
        return str(detail.get("message", "")), detail
    return (str(detail) if detail is not None else text[:300]), None


def parse_response(response: httpx.Response, route_prefix: str) -> Any:
    """Turn a response into a result, ``Pending``, or the right ``ServeError``."""
    try:
        data = response.json()
    except ValueError:
        data = _NOT_JSON
    return parse_answer(response.status_code, data, route_prefix, text=response.text)


def parse_answer(status: int, data: Any, route_prefix: str, *, text: str = "") -> Any:
    """One answer (a call's, or one item's of a coalesced call): the result,
    ``Pending``, or raises the right ``ServeError``. ``data`` is the decoded JSON, or
    ``_NOT_JSON`` with the raw ``text``."""
    if status < 400:
        if data is _NOT_JSON:
            raise ServeServerError(
                f"{route_prefix}: the endpoint answered {status} with a body that is not JSON",
                status_code=status,
                code="invalid_json",
            )
        if is_envelope(data):
            state, ticket = data.get("status"), data.get("ticket")
            if state == "pending" and isinstance(ticket, str):
                return Pending(ticket)
            if state == "failed":
                raise DeferredFailed(
                    f"{route_prefix}: deferred inference failed: {data.get('error')}",
                    status_code=status,
                    code="deferred_failed",
                )
            if state == "not_found":
                raise DeferredNotFound(
                    f"{route_prefix}: deferred ticket not found", code="deferred_not_found"
                )
            raise ServeServerError(
                f"{route_prefix}: malformed deferred envelope (status={state!r})",
                status_code=status,
                code="invalid_envelope",
            )
        return data
    message, ours = _error_detail(status, data, text)
    text = f"{route_prefix}: {status} {message}".strip()
    code = ours.get("code") if ours else None
    if ours is not None:
        cls = ServeTransientError if ours.get("transient") else ServeClientError
        if cls is ServeClientError and status >= 500:
            cls = ServeServerError
        raise cls(text, status_code=status, code=code)
    if status in TRANSIENT_STATUS:
        raise ServeTransientError(text, status_code=status)
    if status == 404:
        # Not our runtime's answer: the proxy has no application at this route (yet).
        raise ServeRouteNotFound(text, status_code=status, code="route_not_found")
    if status < 500:
        raise ServeClientError(text, status_code=status)
    raise ServeServerError(text, status_code=status)


def parse_items(data: Any, count: int, route_prefix: str) -> list[Any]:
    """A coalesced call's answer: per item, its result, ``Pending`` or ``ServeError``
    (returned, not raised: one item's error is that item's alone)."""
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != count:
        raise ServeServerError(
            f"{route_prefix}: a coalesced call of {count} items was answered with "
            f"{len(items) if isinstance(items, list) else 'no'} items",
            code="invalid_items_answer",
        )
    out: list[Any] = []
    for item in items:
        try:
            if not isinstance(item, dict) or not isinstance(item.get("status"), int):
                raise ServeServerError(
                    f"{route_prefix}: malformed item in a coalesced answer",
                    code="invalid_items_answer",
                )
            body = item.get("body")
            raw = body if isinstance(body, str) else ""
            out.append(parse_answer(item["status"], body, route_prefix, text=raw))
        except ServeError as e:
            out.append(e)
    return out


_default: ServeClient | None = None
_default_lock = threading.Lock()


def default_client() -> ServeClient:
    """The process-wide pooled client (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ServeClient()
        return _default


def reset_default_client() -> None:
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = None
