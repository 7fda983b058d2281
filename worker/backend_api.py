"""The worker's client for the Synapse backend: jobs and logs (backend-api.md).

One pooled httpx client per process, explicit timeouts, and two errors that say what
to do: ``BackendUnavailable`` (retry later: connection trouble, 5xx, 429) and
``BackendRejected`` (4xx: the request is wrong, retrying cannot help).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx

from config import Settings, get_settings
from config.errors import BridgeError

FINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class BackendError(BridgeError):
    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class BackendUnavailable(BackendError):
    """Transient: the backend could not be reached or answered 5xx/429."""

    transient = True


class BackendRejected(BackendError):
    """The backend refused the request (4xx)."""


class BackendAPI:
    """Jobs and logs, with the service token of this worker."""

    def __init__(self, settings: Settings | None = None, *, base_url: str | None = None):
        settings = settings or get_settings()
        self.base_url = (base_url or settings.require_backend_url()).rstrip("/")
        token = settings.access_token.get_secret_value() if settings.access_token else None
        if not token:
            from config import SettingsError

            raise SettingsError("the worker needs SYNAPSE_ACCESS_TOKEN (a service token)")
        pool = max(64, settings.worker_concurrency + 8)  # every thread may write at once
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            headers={"Authorization": f"Token {token}"},
            timeout=httpx.Timeout(settings.backend_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, tenant: str | None = None, **kw: Any) -> Any:
        headers = {"Synapse-Tenant": f"Token {tenant}"} if tenant else None
        try:
            r = self._http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as e:
            raise BackendUnavailable(f"{method} {path}: {type(e).__name__}") from None
        if r.status_code >= 500 or r.status_code == 429:
            raise BackendUnavailable(f"{method} {path}: {r.status_code}", r.status_code)
        if r.status_code >= 400:
            raise BackendRejected(f"{method} {path}: {r.status_code} {r.text[:300]}", r.status_code)
        return r.json() if r.content else None

    def get_job(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"jobs/{job_id}/", tenant=tenant)

    def patch_job(self, job_id: str, body: dict[str, Any], tenant: str | None = None) -> Any:
        return self._call("PATCH", f"jobs/{job_id}/", tenant=tenant, json=body)

    def post_logs(self, entries: list[dict[str, Any]]) -> None:
        self._call("POST", "logs/", json=entries)

    def iter_jobs(
        self, *, status: str, action: str, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """Every job matching, following ``next`` links page by page."""
        url: str | None = f"jobs/?status={status}&action={action}&page_size={page_size}"
        while url:
            page = self._call("GET", url)
            yield from page.get("results", [])
            url = page.get("next")


_default: BackendAPI | None = None
_lock = threading.Lock()


def default_backend() -> BackendAPI:
    global _default
    with _lock:
        if _default is None:
            _default = BackendAPI()
        return _default


def reset_default_backend() -> None:
    global _default
    with _lock:
        if _default is not None:
            _default.close()
        _default = None
