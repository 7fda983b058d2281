"""The replica's client of the Synapse backend: model metadata, and who gets credentials.

The caller's token goes to the backend only. A model's ``file`` URL may name another
host (object storage, a pre-signed URL): that host gets no ``Authorization`` or tenant
header, and redirects are never followed, so a redirect cannot carry the token away
either. A model id is checked against config/ids.py before it goes into a URL path.
"""

from __future__ import annotations

from typing import Any

import httpx

from config.errors import BridgeError
from config.ids import InvalidId, check_model_id, check_tenant
from serve_runtime.shared_client import SharedAsyncClient

_DEFAULT_PORTS = {"http": 80, "https": 443}


class ModelAccessError(BridgeError):
    """A model cannot be served to this caller; ``status`` is the HTTP answer to give."""

    def __init__(self, message: str, *, status: int, code: str, transient: bool = False):
        super().__init__(message, transient=transient)
        self.status = status
        self.code = code


def auth_headers(token: str, tenant: str | None) -> dict[str, str]:
    """The backend's auth headers (backend-api.md)."""
    headers = {"Authorization": f"Token {token}"}
    if tenant:
        headers["Synapse-Tenant"] = f"Token {tenant}"
    return headers


def origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the default port filled in; None for no usable URL."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    scheme = u.scheme.lower()
    if not scheme or not u.host:
        return None
    return scheme, u.host.lower(), u.port or _DEFAULT_PORTS.get(scheme)


class BackendClient:
    """The replica's view of the Synapse backend: model metadata and files."""

    def __init__(self, base_url: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self._origin = origin(self.base_url)
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:  # created lazily, on the event loop that uses it
            # Never follow a redirect: it could take the caller's token to another host.
            self._http = SharedAsyncClient(timeout=self.timeout, follow_redirects=False)
        return self._http

    def file_headers(self, url: str, token: str, tenant: str | None) -> dict[str, str]:
        """The headers to download ``url`` with: the caller's credentials on the backend's
        own origin (its downloads need them), none anywhere else."""
        here = origin(url)
        if here is None or here != self._origin:
            return {}
        return auth_headers(token, tenant)

    async def get_model(self, model_id: str, token: str, tenant: str | None) -> dict[str, Any]:
        try:
            model_id = check_model_id(model_id, "model id")
            if tenant:
                check_tenant(tenant)  # it goes into a header
        except InvalidId as e:  # never sent: httpx would resolve '..' to another path
            code = "invalid_tenant" if e.field == "tenant" else "invalid_model_id"
            raise ModelAccessError(str(e), status=400, code=code) from None
        url = f"{self.base_url}/models/{model_id}/"
        try:
            r = await self.http.get(url, headers=auth_headers(token, tenant))
        except httpx.HTTPError as e:
            raise ModelAccessError(
                f"backend unreachable for model {model_id} ({type(e).__name__})",
                status=503,
                code="backend_unavailable",
                transient=True,
            ) from None
        if r.status_code == 200:
            return r.json()
        if r.status_code == 401:
            raise ModelAccessError(
                "backend refused the user token (401)", status=401, code="unauthorized"
            )
        if r.status_code == 403:
            raise ModelAccessError(
                f"no access to model {model_id} in tenant {tenant!r}", status=403, code="forbidden"
            )
        if r.status_code == 404:
            raise ModelAccessError(
                f"model {model_id} not found", status=404, code="model_not_found"
            )
        raise ModelAccessError(
            f"backend answered {r.status_code} for model {model_id}",
            status=503 if r.status_code >= 500 else 502,
            code="backend_error",
            transient=r.status_code >= 500,
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
