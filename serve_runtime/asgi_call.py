"""One HTTP request through an ASGI app in process: the replica's end of a handle call.

``serve_runtime.handle_transport`` sends the worker's serve calls through a
``DeploymentHandle`` instead of Serve's HTTP proxy; the replica runs each one through
its own FastAPI app (``BaseServeDeployment.asgi_request``), so the plugin, the
runtime's middleware (headers, coalesced calls) and its checks see what a request from
the proxy shows them.
"""

from __future__ import annotations

from typing import Any

import structlog

log = structlog.get_logger("serve_runtime.asgi_call")

Headers = list[tuple[bytes, bytes]]


async def call_asgi(
    app: Any, method: str, path: str, root_path: str, headers: Headers, body: bytes
) -> tuple[int, Headers, bytes]:
    """The response (status, headers, body) of ``app`` to one request.

    An exception the app lets out after it started its answer keeps that answer (a
    500 from Starlette's error middleware, say); one before any answer is a 500.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    delivered = False
    status: int | None = None
    out_headers: Headers = []
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:
        log.exception("asgi_request_failed", method=method, path=path)
        if status is None:
            return 500, [(b"content-type", b"text/plain")], b"Internal Server Error"
    if status is None:
        return 500, [(b"content-type", b"text/plain")], b"the app sent no answer"
    return status, out_headers, b"".join(chunks)
