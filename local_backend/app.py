"""The HTTP API of the local backend: the subset of backend-api.md, plus ``_admin/``.

Authentication (as the real backend): ``Synapse-Access-Token: Token <t>`` or
``Authorization: Token <t>`` (the first wins when both are sent), and the tenant the
call acts in as ``Synapse-Tenant: Token <code>`` (a bare code is accepted too).

- no token, a malformed header or an unknown token: **401** (with ``WWW-Authenticate``);
- a valid token without access: **403**. We answer 403, not 404, so a test (and a
  developer) can tell "no such object" (404) from "not yours" (403). This leaks the
  existence of ids, which is fine for a local stand-in. 403 covers: a ``Synapse-Tenant``
  the user is not a member of, a tenant header that differs from the object's tenant,
  a model of another tenant, and a tenant member who is not in a model's grant list.
- a ``service`` user may act in every tenant and read every model.

Order of checks, as in DRF: 401, then 404 (unknown object), then 403, then 400 (body).

Errors are ``{"detail": ...}``; a bad body (unknown field, bad status) also names the
fields in ``{"fields": {name: [message]}}``.

A job's status only moves forward (``db.refusal``): a PATCH over SUCCEEDED, FAILED or
STOPPED, or one that would move a status back, answers **409**
``{"detail": "job is STOPPED; RUNNING refused", "status": "STOPPED"}`` and changes
nothing. Checks run 401, 404, 403, 400, then 409. Accepted PATCHes and 409-refused ones
go to the write log (the latter flagged ``refused``); other rejected ones (400, 403) do
not. A user stops a job with ``PATCH jobs/{id}/ {"status": "STOPPED"}``; the admin API
has ``POST _admin/jobs/{id}/stop/``.

``GET jobs/`` pages like DRF: ``page`` (from 1) and ``page_size`` (default 100, at most
1000); a page past the end answers 404 (``page=1`` of an empty list is 200).
"""

from __future__ import annotations

import hmac
import sqlite3
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import TypeAdapter, ValidationError

from local_backend import DEFAULT_ADMIN_TOKEN
from local_backend.db import (
    JOB_STATUSES,
    JOB_WRITABLE_FIELDS,
    Database,
    Model,
    TransitionRefused,
    User,
)
from local_backend.faults import FaultMiddleware, FaultState, parse_faults
from local_backend.seed import JobSpec, SeedSpec, apply_seed, models_dir

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
REQUEST_LOG_SIZE = 10_000
MEDIA_TYPES = {"zip": "application/zip", "tar": "application/x-tar", "tar.gz": "application/gzip"}

ADMIN_USER = "_admin"  # the write log's ``user`` for writes made through ``_admin/``

_jobs_adapter = TypeAdapter(list[JobSpec])


class BackendApp(FastAPI):
    """FastAPI with the fault layer outermost, directly under the server (so a drop can
    reach the server's transport; Starlette's own middleware would wrap ``send``)."""

    def __init__(self, *args: Any, faults: FaultState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = faults
        self._fault_layer = FaultMiddleware(super().__call__, faults)
        # The public API's requests as they arrived (the last REQUEST_LOG_SIZE): a test
        # can tell that a path was never asked for.
        self.request_log: deque[dict[str, str]] = deque(maxlen=REQUEST_LOG_SIZE)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/_admin"):
            raw = scope.get("raw_path") or scope["path"].encode()
            self.request_log.append({"method": scope["method"], "path": raw.decode("latin-1")})
        await self._fault_layer(scope, receive, send)


def _error(status: int, detail: Any, fields: dict[str, list[str]] | None = None) -> HTTPException:
    body: Any = detail if fields is None else {"detail": detail, "fields": fields}
    return HTTPException(status_code=status, detail=body)


def _token_value(raw: str | None) -> str | None:
    """``Token <value>`` -> value; None when the header is absent."""
    if raw is None:
        return None
    scheme, _, value = raw.strip().partition(" ")
    if scheme.lower() != "token" or not value.strip():
        return ""
    return value.strip()


def create_app(
    data_dir: Path,
    public_url: str | None = None,
    admin_token: str = DEFAULT_ADMIN_TOKEN,
    faults: Any = None,
) -> BackendApp:
    """Build the app over the store in ``data_dir`` (created if missing).

    ``public_url`` is the base of file URLs and ``next`` links (default: the request's
    own base URL); ``faults`` is an initial fault config (see ``faults.parse_faults``).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database.in_dir(data_dir)
    public = public_url.rstrip("/") if public_url else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        db.close()

    app = BackendApp(
        title="Synapse local backend",
        lifespan=lifespan,
        faults=FaultState(parse_faults(faults)),
        docs_url="/_admin/docs",
        openapi_url="/_admin/openapi.json",
        redoc_url=None,
    )
    app.state.db = db
    app.state.data_dir = data_dir

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        content = exc.detail if isinstance(exc.detail, dict) else {"detail": exc.detail}
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", "Token")
        return JSONResponse(content, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": jsonable_errors(exc.errors())}, status_code=400)

    def base_url(request: Request) -> str:
        return public or str(request.base_url).rstrip("/")

    # -- auth -------------------------------------------------------------------------

    def authenticate(request: Request) -> User:
        raw = request.headers.get("synapse-access-token") or request.headers.get("authorization")
        token = _token_value(raw)
        if token is None:
            raise _error(401, "Authentication credentials were not provided.")
        if not token:
            raise _error(401, "Invalid token header.")
        user = db.user_for_token(token)
        if user is None:
            raise _error(401, "Invalid token.")
        return user

    def tenant_header(request: Request, user: User) -> str | None:
        tenant = _token_value(request.headers.get("synapse-tenant"))
        if tenant is None:
            return None
        if tenant == "":  # a bare code
            tenant = request.headers["synapse-tenant"].strip()
        if not user.can_act_in(tenant):
            raise _error(403, f"Not a member of tenant {tenant!r}.")
        return tenant

    def check_object(request: Request, user: User, obj_tenant: str, allowed: bool) -> None:
        tenant = tenant_header(request, user)
        if tenant is not None and tenant != obj_tenant:
            raise _error(403, "The object belongs to another tenant.")
        if not allowed:
            raise _error(403, "You do not have permission to perform this action.")

    def require_admin(request: Request) -> None:
        given = request.headers.get("synapse-admin-token", "")
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            raise _error(401, "Admin token missing or wrong.")

    # -- public API -------------------------------------------------------------------

    @app.get("/health/")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    def load_model(model_id: str) -> Model:
        try:
            mid = int(model_id)
        except ValueError:
            raise _error(404, "Not found.") from None
        model = db.get_model(mid)
        if model is None:
            raise _error(404, "Not found.")
        return model

    @app.get("/models/{model_id}/")
    def get_model(model_id: str, request: Request) -> dict[str, Any]:
        user = authenticate(request)
        model = load_model(model_id)
        check_object(request, user, model.tenant, model.allows(user))
        db.bump(f"model_gets:{model.id}")
        file_url = model.file_url or (
            f"{base_url(request)}/files/models/{model.file_name}" if model.file_name else None
        )
        return {
            "id": model.id,
            "name": model.name,
            "tenant": model.tenant,
            "file": file_url,
            "checksum": model.checksum,
            "size": model.size,
            "version": model.version,
        }

    @app.get("/files/models/{name}")
    def get_model_file(name: str, request: Request) -> FileResponse:
        user = authenticate(request)
        model = load_model(name.split(".", 1)[0])
        if model.file_name != name:
            raise _error(404, "Not found.")
        check_object(request, user, model.tenant, model.allows(user))
        path = models_dir(data_dir) / name
        if not path.is_file():
            raise _error(404, "The model's file is missing from the store.")
        db.bump("downloads", f"downloads:{model.id}")
        ext = name.split(".", 1)[1]
        return FileResponse(
            path, media_type=MEDIA_TYPES.get(ext, "application/octet-stream"), filename=name
        )

    @app.get("/jobs/")
    def list_jobs(
        request: Request,
        status: str | None = None,
        action: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page: str = "1",
    ) -> dict[str, Any]:
        user = authenticate(request)
        tenant = tenant_header(request, user)
        if status is not None and status not in JOB_STATUSES:
            raise _error(400, f"Invalid status {status!r}.", {"status": ["Invalid choice."]})
        page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        try:
            page_no = int(page)
        except ValueError:
            raise _error(404, "Invalid page.") from None
        if tenant is not None:
            tenants: list[str] | None = [tenant]
        elif user.service:
            tenants = None
        else:
            tenants = sorted(user.tenants)
        count, results = db.list_jobs(
            tenants=tenants,
            status=status,
            action=action,
            limit=page_size,
            offset=(page_no - 1) * page_size,
        )
        if page_no < 1 or (page_no > 1 and not results):
            raise _error(404, "Invalid page.")
        params = dict(request.query_params)

        def page_url(n: int) -> str:
            return f"{base_url(request)}/jobs/?{urlencode({**params, 'page': n})}"

        return {
            "count": count,
            "next": page_url(page_no + 1) if page_no * page_size < count else None,
            "previous": page_url(page_no - 1) if page_no > 1 else None,
            "results": results,
        }

    def load_job(job_id: str, request: Request, user: User) -> dict[str, Any]:
        job = db.get_job(job_id)
        if job is None:
            raise _error(404, "Not found.")
        check_object(request, user, job["tenant"], user.can_act_in(job["tenant"]))
        return job

    @app.get("/jobs/{job_id}/")
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        user = authenticate(request)
        return load_job(job_id, request, user)

    @app.patch("/jobs/{job_id}/")
    def patch_job(job_id: str, request: Request, body: Any = Body(None)) -> dict[str, Any]:
        user = authenticate(request)
        load_job(job_id, request, user)
        if not isinstance(body, dict):
            raise _error(400, "Expected a JSON object.")
        unknown = sorted(set(body) - set(JOB_WRITABLE_FIELDS))
        if unknown:
            raise _error(
                400,
                f"Unknown field(s): {', '.join(unknown)}.",
                {f: ["Unknown field."] for f in unknown},
            )
        if "status" in body and body["status"] not in JOB_STATUSES:
            raise _error(
                400,
                f"Invalid status {body['status']!r}; expected one of {', '.join(JOB_STATUSES)}.",
                {"status": ["Invalid choice."]},
            )
        return write_job(job_id, body, user.name)

    def write_job(job_id: str, body: dict[str, Any], user: str) -> dict[str, Any]:
        try:
            job = db.patch_job(job_id, body, user=user)
        except TransitionRefused as exc:
            raise HTTPException(
                status_code=409, detail={"detail": exc.detail, "status": exc.status}
            ) from None
        if job is None:
            raise _error(404, "Not found.")
        return job

    @app.post("/logs/", status_code=201)
    def post_logs(request: Request, body: Any = Body(None)) -> Any:
        user = authenticate(request)
        entries = body if isinstance(body, list) else [body]
        clean: list[dict[str, Any]] = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise _error(400, f"Entry {i}: expected a JSON object.")
            message, level, job_id = e.get("message", ""), e.get("level", "info"), e.get("job")
            if not isinstance(message, str) or not isinstance(level, str):
                raise _error(400, f"Entry {i}: 'message' and 'level' must be strings.")
            if job_id is not None:
                job = db.get_job(str(job_id))
                if job is None:
                    raise _error(400, f"Entry {i}: unknown job {job_id!r}.", {"job": ["Unknown."]})
                check_object(request, user, job["tenant"], user.can_act_in(job["tenant"]))
                job_id = job["id"]
            clean.append({"job": job_id, "level": level, "message": message, "data": e.get("data")})
        db.add_logs(clean, user.name)
        return clean if isinstance(body, list) else clean[0]

    # -- admin ------------------------------------------------------------------------

    @app.post("/_admin/seed/")
    def admin_seed(request: Request, body: Any = Body(None)) -> Any:
        require_admin(request)
        try:
            spec = SeedSpec.model_validate(body)
            return apply_seed(db, data_dir, spec)
        except ValidationError as exc:
            raise _error(400, jsonable_errors(exc.errors())) from None
        except (ValueError, OSError) as exc:
            raise _error(400, str(exc)) from None

    @app.post("/_admin/jobs/", status_code=201)
    def admin_create_jobs(request: Request, body: Any = Body(None)) -> list[dict[str, Any]]:
        require_admin(request)
        try:
            specs = _jobs_adapter.validate_python(body if isinstance(body, list) else [body])
        except ValidationError as exc:
            raise _error(400, jsonable_errors(exc.errors())) from None
        created = []
        for spec in specs:
            try:
                created.append(db.insert_job(spec.record()))
            except sqlite3.IntegrityError:
                raise _error(409, f"Job {spec.id!r} already exists.") from None
        return created

    @app.get("/_admin/jobs/")
    def admin_list_jobs(
        request: Request,
        status: str | None = None,
        tenant: str | None = None,
        action: str | None = None,
    ) -> list[dict[str, Any]]:
        require_admin(request)
        _, jobs = db.list_jobs(
            tenants=None if tenant is None else [tenant], status=status, action=action
        )
        return jobs

    @app.get("/_admin/jobs/{job_id}/")
    def admin_get_job(job_id: str, request: Request) -> dict[str, Any]:
        require_admin(request)
        job = db.get_job(job_id)
        if job is None:
            raise _error(404, "Not found.")
        return job

    @app.get("/_admin/jobs/{job_id}/writes/")
    def admin_job_writes(
        job_id: str, request: Request, refused: bool | None = None
    ) -> list[dict[str, Any]]:
        """The write log, accepted and refused PATCHes; ``?refused=false|true`` filters."""
        require_admin(request)
        if db.get_job(job_id) is None:
            raise _error(404, "Not found.")
        return db.job_writes(job_id, refused=refused)

    @app.post("/_admin/jobs/{job_id}/stop/")
    def admin_stop_job(job_id: str, request: Request) -> dict[str, Any]:
        """Stop (cancel) a job, as a person would: PENDING, QUEUED or RUNNING -> STOPPED.
        Same rule and write log as a PATCH (user ``_admin``); a final job answers 409."""
        require_admin(request)
        return write_job(job_id, {"status": "STOPPED"}, ADMIN_USER)

    @app.post("/_admin/writes/summary/")
    def admin_write_summary(
        request: Request, job_ids: list[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per job (all, or those listed): status, ``writes`` and ``final_writes`` (accepted
        PATCHes), ``refused`` and ``refused_final`` (409-refused ones)."""
        require_admin(request)
        return db.write_summary(job_ids)

    @app.get("/_admin/logs/")
    def admin_logs(request: Request, job: str | None = None) -> list[dict[str, Any]]:
        require_admin(request)
        return db.logs(job)

    @app.get("/_admin/faults/")
    def admin_get_faults(request: Request) -> dict[str, Any]:
        require_admin(request)
        return app.faults.snapshot()

    @app.put("/_admin/faults/")
    def admin_set_faults(request: Request, body: Any = Body(None)) -> dict[str, Any]:
        require_admin(request)
        try:
            app.faults.set(parse_faults(body))
        except ValidationError as exc:
            raise _error(400, jsonable_errors(exc.errors())) from None
        return app.faults.snapshot()

    @app.delete("/_admin/faults/")
    def admin_clear_faults(request: Request) -> dict[str, Any]:
        require_admin(request)
        app.faults.clear()
        return app.faults.snapshot()

    @app.get("/_admin/requests/")
    def admin_requests(request: Request) -> list[dict[str, str]]:
        """The public API's requests, oldest first: ``[{"method", "path"}]`` (raw path)."""
        require_admin(request)
        return list(app.request_log)

    @app.delete("/_admin/requests/")
    def admin_clear_requests(request: Request) -> dict[str, int]:
        require_admin(request)
        app.request_log.clear()
        return {"requests": 0}

    @app.get("/_admin/stats/")
    def admin_stats(request: Request) -> dict[str, Any]:
        require_admin(request)
        return db.stats()

    @app.delete("/_admin/stats/")
    def admin_reset_stats(request: Request) -> dict[str, Any]:
        """Reset the counters (patches, downloads, model GETs); jobs and logs stay."""
        require_admin(request)
        db.reset_counters()
        return db.stats()

    return app


def jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without the parts that may not serialize (ctx, input, url)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]
