"""Serve calls through a ``DeploymentHandle``, not Serve's HTTP proxy (issue 13).

``SYNAPSE_BRIDGE_SERVE_TRANSPORT=handle``: for a worker that runs on a node of the
Ray cluster (it joins it as a driver, ``RAY_ADDRESS``). ``ServeClient`` builds and
reads the same HTTP requests and answers as ever; this httpx transport hands each one
to the application's ingress deployment, whose replica runs it through its own FastAPI
app in process (``BaseServeDeployment.asgi_request``). Routing is Serve's: the
request's ``serve_multiplexed_model_id`` header becomes the handle's
``multiplexed_model_id``, as the proxy does with it. ``bench/handle_path.py`` measured
this path at about half the CPU of a proxied call (bench/FINDINGS.md).

Ray's failures reach the client as httpx's: no answer within the read timeout is a
``ReadTimeout``; a replica that died or became unavailable, or a deployment without
replicas, a ``RemoteProtocolError``. ``ServeClient`` makes those its transient errors,
so the job retries, as after a broken connection to the proxy. A route no application
serves is a 404, as the proxy answers.
"""

from __future__ import annotations

import threading
import time

import httpx
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from config import Settings
from serve_runtime import ray_driver
from serve_runtime.applications import routes
from serve_runtime.tokens import MODEL_TOKEN_HEADER

# How long the route table read from Serve is trusted before a miss reads it again.
ROUTES_FRESH_S = 5.0


class HandleTransport(httpx.BaseTransport):
    """An httpx transport whose requests go to Serve applications through handles."""

    def __init__(self, settings: Settings) -> None:
        try:
            ray_driver.join(settings.ray_address)
        except ConnectionError as e:
            raise ConnectionError(
                "SYNAPSE_BRIDGE_SERVE_TRANSPORT=handle: no Ray cluster at "
                f"{settings.ray_address or 'auto'} (set RAY_ADDRESS to the cluster's "
                "address, or use the http transport)"
            ) from e
        self._lock = threading.Lock()
        self._routes: dict[str, str] = {}  # route prefix -> application name
        self._routes_at = 0.0
        self._handles: dict[str, DeploymentHandle] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        found = self._app_for(path)
        if found is None:
            return httpx.Response(404, text=f"Path '{path}' not found.", request=request)
        app_name, route_prefix = found
        timeout = request.extensions.get("timeout", {}).get("read")
        headers = [(k.lower(), v) for k, v in request.headers.raw]
        call = self._handle(app_name).options(
            method_name="asgi_request",
            multiplexed_model_id=request.headers.get(MODEL_TOKEN_HEADER, ""),
        )
        root_path = "" if route_prefix == "/" else route_prefix
        response = call.remote(request.method, path, root_path, headers, request.read())
        try:
            status, out_headers, body = response.result(timeout_s=timeout)
        except TimeoutError:
            response.cancel()
            raise httpx.ReadTimeout(
                f"no answer from {app_name} in {timeout}s", request=request
            ) from None
        except BackPressureError as e:
            return httpx.Response(503, text=str(e), request=request)
        except (RayError, RayServeException) as e:
            self._forget(app_name)
            raise httpx.RemoteProtocolError(
                f"serve handle call to {app_name} failed: {type(e).__name__}", request=request
            ) from None
        return httpx.Response(status, headers=out_headers, content=body, request=request)

    def _app_for(self, path: str) -> tuple[str, str] | None:
        """The application serving ``path`` (the longest route prefix that holds it);
        the route table is read again when stale, or on a miss unless just read."""
        with self._lock:
            stale = time.monotonic() - self._routes_at > ROUTES_FRESH_S
            if stale:
                self._read_routes()
            matches = [p for p in self._routes if _under(path, p)]
            if not matches and not stale:
                self._read_routes()
                matches = [p for p in self._routes if _under(path, p)]
            if not matches:
                return None
            prefix = max(matches, key=len)
            return self._routes[prefix], prefix

    def _read_routes(self) -> None:
        self._routes = {prefix: name for name, prefix in routes().items() if prefix}
        self._routes_at = time.monotonic()

    def _handle(self, app_name: str) -> DeploymentHandle:
        with self._lock:
            handle = self._handles.get(app_name)
            if handle is None:
                handle = self._handles[app_name] = serve.get_app_handle(app_name)
            return handle

    def _forget(self, app_name: str) -> None:
        """After a failed call: the next one looks the application up again."""
        with self._lock:
            self._handles.pop(app_name, None)
            self._routes_at = 0.0


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")
