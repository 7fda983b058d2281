"""The worker's client for the Synapse backend: jobs (backend-api.md).

One pooled httpx client per process. Every call has a total deadline
(``backend_timeout_s``, from the first byte sent to the last byte read, however slowly
the server answers), so a caller holding a lock knows how long a call can last.

Every failure is a ``BackendError`` that says what to do:

- ``BackendUnavailable`` (transient): connection trouble, the deadline passed, 5xx, 429.
- ``BackendRejected``: the backend answered 4xx; ``BackendConflict`` is its 409 (the
  job's status does not allow the write; ``current_status`` says what it is).
- ``BackendInvalidRequest``: the request could not be made (a job id that is not one,
  a tenant that cannot go in a header, a body that is not JSON); nothing was sent.
- ``BackendBadResponse``: the backend answered 2xx with something that is not the
  JSON it promises.

Only the first is worth trying again. No message carries a token.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

from config import Settings, SettingsError, get_settings, redact_text
from config.errors import BridgeError
from config.ids import InvalidId, check_job_id, check_tenant
from serve_runtime.http_pool import ShardedTransport
from serve_runtime.shared_client import SharedClient

FINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# The forward order of a job's status; the final ones share the last rank.
STATUS_RANK = {"PENDING": 0, "QUEUED": 1, "RUNNING": 2, "SUCCEEDED": 3, "FAILED": 3, "STOPPED": 3}

# A 2xx answer larger than this is not a job: refused rather than held in memory.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class BackendError(BridgeError):
    """A backend call failed; ``status_code`` is the HTTP status when there was one."""

    def __init__(
        self, message: str, status_code: int | None = None, *, request_bytes: int | None = None
    ) -> None:
        super().__init__(redact_text(message))
        self.status_code = status_code
        self.request_bytes = request_bytes  # the size of the body sent, if any


class BackendUnavailable(BackendError):
    """Transient: the backend could not be reached in time or answered 5xx/429."""

    transient = True


class BackendRejected(BackendError):
    """The backend refused the request (4xx): the same request will be refused again."""


class BackendConflict(BackendRejected):
    """409: the job's status does not allow the write (it is final or stopped)."""

    def __init__(
        self, message: str, *, current_status: str | None, request_bytes: int | None = None
    ) -> None:
        super().__init__(message, 409, request_bytes=request_bytes)
        self.current_status = current_status


class BackendInvalidRequest(BackendError):
    """The request could not be made as asked; nothing reached the backend."""


class BackendBadResponse(BackendError):
    """The backend answered 2xx with something unreadable: what it did is unknown."""


def encode_json(body: Any) -> bytes:
    """The exact bytes a JSON body is sent as (strict JSON: no NaN or Infinity)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def job_path(job_id: Any) -> str:
    """``jobs/{id}/``, for a job id that cannot change the path (config/ids.py)."""
    try:
        return f"jobs/{check_job_id(job_id)}/"
    except InvalidId as e:
        raise BackendInvalidRequest(str(e)) from None


# -- the total deadline, enforced at every socket operation

_call_deadline = threading.local()


def _remaining(timeout: float | None, expired: type[Exception]) -> float | None:
    """The time an operation may block: its own timeout, cut at the call's deadline."""
    deadline: float | None = getattr(_call_deadline, "at", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the call's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read and send ends by the calling thread's deadline.

    httpx's timeouts are per operation: a server that dribbles its answer one byte at a
    time never trips them. Cutting each operation at the deadline bounds the whole call.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        sock = self._inner.get_extra_info("socket")
        if sock is None:  # not a plain socket stream: one bounded write
            self._inner.write(buffer, _remaining(timeout, httpcore.WriteTimeout))
            return
        view = memoryview(buffer)
        try:
            while view:  # each send() bounded, not just the first
                sock.settimeout(_remaining(timeout, httpcore.WriteTimeout))
                view = view[sock.send(view) :]
        except TimeoutError as e:
            raise httpcore.WriteTimeout(str(e)) from e
        except OSError as e:
            raise httpcore.WriteError(str(e)) from e

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        t = _remaining(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, t))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        t = _remaining(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.connect_tcp(host, port, t, local_address, socket_options)
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        t = _remaining(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, t, socket_options))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _DeadlineTransport(ShardedTransport):
    """The sharded transport (serve_runtime/http_pool.py) over ``_DeadlineBackend``."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits, network_backend=_DeadlineBackend())


class BackendAPI:
    """Jobs, with the service token of this worker.

    The backend is reached directly (environment proxy variables are not used), so that
    the deadline holds on the socket that talks to it.
    """

    def __init__(self, settings: Settings | None = None, *, base_url: str | None = None):
        settings = settings or get_settings()
        self.base_url = (base_url or settings.require_backend_url()).rstrip("/")
        token = settings.access_token.get_secret_value() if settings.access_token else None
        if not token:
            raise SettingsError("the worker needs SYNAPSE_ACCESS_TOKEN (a service token)")
        self.deadline_s = settings.backend_timeout_s
        pool = max(64, settings.worker_concurrency + 8)  # every thread may write at once
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self._http = SharedClient(
            base_url=self.base_url + "/",
            headers={"Authorization": f"Token {token}"},
            timeout=httpx.Timeout(self.deadline_s, connect=min(5.0, self.deadline_s)),
            transport=_DeadlineTransport(limits),
        )

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        tenant: str | None = None,
        body: Any = None,
        deadline: float | None = None,
    ) -> Any:
        """One request, over by ``deadline`` (``time.monotonic()``; default: now plus
        ``backend_timeout_s``), every failure a ``BackendError``."""
        what = f"{method} {path.split('?')[0]}"
        headers: dict[str, str] = {}
        if tenant is not None:
            try:
                headers["Synapse-Tenant"] = f"Token {check_tenant(tenant)}"
            except InvalidId as e:
                raise BackendInvalidRequest(f"{what}: {e}") from None
        content: bytes | None = None
        if body is not None:
            try:
                content = encode_json(body)
            except (TypeError, ValueError) as e:
                raise BackendInvalidRequest(f"{what}: the body is not JSON: {e}") from None
            headers["Content-Type"] = "application/json"
        size = len(content) if content is not None else None
        at = time.monotonic() + self.deadline_s if deadline is None else deadline
        left = at - time.monotonic()
        if left <= 0:
            raise BackendUnavailable(f"{what}: no time left to make the call", request_bytes=size)
        _call_deadline.at = at
        try:
            request = self._http.build_request(
                method,
                path,
                headers=headers,
                content=content,
                timeout=httpx.Timeout(left, connect=min(5.0, left), pool=left),
            )
            r = self._http.send(request, stream=True)
            try:
                status = r.status_code
                data = self._read(r, what, status, size)
            finally:
                r.close()
        except BackendError:
            raise
        except httpx.DecodingError as e:
            raise BackendBadResponse(f"{what}: the answer cannot be decoded: {e}") from None
        except httpx.LocalProtocolError as e:  # h11 refused to write what we built
            raise BackendInvalidRequest(f"{what}: the request is malformed: {e}") from None
        except httpx.TransportError as e:
            if time.monotonic() >= at:
                raise BackendUnavailable(
                    f"{what}: no complete answer within the call's deadline", request_bytes=size
                ) from None
            raise BackendUnavailable(f"{what}: {type(e).__name__}", request_bytes=size) from None
        except Exception as e:  # an id in the URL, a header value, anything else of ours
            raise BackendInvalidRequest(
                f"{what}: the request could not be made: {type(e).__name__}: {str(e)[:200]}"
            ) from None
        finally:
            _call_deadline.at = None

        if status >= 500 or status == 429:
            raise BackendUnavailable(f"{what}: {status}", status, request_bytes=size)
        if status == 409:
            current = data.get("status") if isinstance(data, dict) else None
            if current is None and isinstance(data, dict) and isinstance(data.get("detail"), dict):
                current = data["detail"].get("status")
            raise BackendConflict(
                f"{what}: 409 {_short(data)}",
                current_status=current if isinstance(current, str) else None,
                request_bytes=size,
            )
        if status >= 400:
            raise BackendRejected(f"{what}: {status} {_short(data)}", status, request_bytes=size)
        if status >= 300 or isinstance(data, _Unreadable):
            said = data if isinstance(data, _Unreadable) else "a redirect"
            raise BackendBadResponse(f"{what}: answered {status} with {said}", status)
        return data

    @staticmethod
    def _read(r: httpx.Response, what: str, status: int, size: int | None) -> Any:
        """The answer's JSON (None when empty), or an ``_Unreadable`` saying why not."""
        chunks: list[bytes] = []
        total = 0
        for chunk in r.iter_bytes():
            total += len(chunk)
            if total > MAX_ANSWER_BYTES:
                return _Unreadable(f"an answer over {MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            ctype = r.headers.get("content-type", "no content type")
            return _Unreadable(f"a body that is not JSON ({ctype[:60]}, {len(raw)} bytes)")

    def get_job(
        self, job_id: str, tenant: str | None = None, *, deadline: float | None = None
    ) -> dict[str, Any]:
        job = self._call("GET", job_path(job_id), tenant=tenant, deadline=deadline)
        if not isinstance(job, dict) or not isinstance(job.get("status"), str):
            raise BackendBadResponse(f"GET {job_path(job_id)}: the answer is not a job", 200)
        return job

    def patch_job(
        self,
        job_id: str,
        body: dict[str, Any],
        tenant: str | None = None,
        *,
        deadline: float | None = None,
    ) -> Any:
        return self._call("PATCH", job_path(job_id), tenant=tenant, body=body, deadline=deadline)

    def iter_jobs(
        self, *, status: str, action: str, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """Every job matching, following ``next`` links page by page."""
        url: str | None = f"jobs/?status={status}&action={action}&page_size={page_size}"
        while url:
            page = self._call("GET", url)
            if not isinstance(page, dict):
                raise BackendBadResponse("GET jobs/: the answer is not a page of jobs", 200)
            yield from page.get("results", [])
            url = page.get("next")


class _Unreadable(str):
    """What a 2xx answer was, when it was not JSON (a reason, not data)."""


def _short(data: Any) -> str:
    """A refusal's body, short and redacted, for an error message."""
    if isinstance(data, _Unreadable):
        return str(data)
    return redact_text(json.dumps(data, default=str)[:300]) if data is not None else ""
