"""A small typed client for the ``_admin/`` endpoints (tests, demo, benchmarks).

Errors raise ``httpx.HTTPStatusError`` (``raise_for_status``). ``auth_headers`` builds
the user-facing headers (token and tenant) the way the real backend expects them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from local_backend import DEFAULT_ADMIN_TOKEN

# The job ids that may go into a URL path: config/ids.py's set (repeated here, as this
# package imports nothing else of ours): no '/', '..', '?', '#', '%' or space.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


@dataclass
class Outcomes:
    """What the backend recorded for a set of jobs: each job counted once by its status
    (``not_final``: neither SUCCEEDED, FAILED nor STOPPED), and the jobs given a final
    status more than once (refused attempts count: the worker tried to write twice)."""

    submitted: int
    succeeded: int = 0
    failed: int = 0
    stopped: int = 0
    not_final: int = 0
    written_twice: int = 0
    failed_ids: list[str] = field(default_factory=list)

    @property
    def final(self) -> int:
        return self.succeeded + self.failed + self.stopped


def job_path(job_id: str, tail: str = "") -> str:
    """``_admin/jobs/{id}/<tail>``; ``ValueError`` for an id that would change the path."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {str(job_id)[:40]!r} (letters, digits, _ . : -)")
    return f"_admin/jobs/{job_id}/{tail}"


def auth_headers(token: str, tenant: str | None = None) -> dict[str, str]:
    """``Synapse-Access-Token: Token <t>`` (+ ``Synapse-Tenant: Token <code>``)."""
    headers = {"Synapse-Access-Token": f"Token {token}"}
    if tenant is not None:
        headers["Synapse-Tenant"] = f"Token {tenant}"
    return headers


class AdminClient:
    """Drives a running local backend through its ``_admin/`` endpoints."""

    def __init__(
        self, url: str, admin_token: str = DEFAULT_ADMIN_TOKEN, timeout: float = 10.0
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url + "/",
            headers={"Synapse-Admin-Token": admin_token},
            timeout=timeout,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._http.request(method, path, **kwargs)
        resp.raise_for_status()
        return resp.json()

    def health(self) -> bool:
        try:
            return self._http.get("health/").status_code == 200
        except httpx.TransportError:
            return False

    def seed(self, spec: Any) -> dict[str, Any]:
        """Apply a seed spec (a dict or a ``seed.SeedSpec``); paths are the server's."""
        if hasattr(spec, "model_dump"):
            spec = spec.model_dump(mode="json", exclude_none=True)
        return self._call("POST", "_admin/seed/", json=spec)

    def create_jobs(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._call("POST", "_admin/jobs/", json=jobs)

    def create_job(self, **job: Any) -> dict[str, Any]:
        return self.create_jobs([job])[0]

    def jobs(
        self, status: str | None = None, tenant: str | None = None, action: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"status": status, "tenant": tenant, "action": action}
        return self._call(
            "GET", "_admin/jobs/", params={k: v for k, v in params.items() if v is not None}
        )

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", job_path(job_id))

    def writes(self, job_id: str, refused: bool | None = None) -> list[dict[str, Any]]:
        """The job's write log, oldest first: ``[{"seq", "time", "body", "status",
        "refused", "code", "user"}]``, accepted and 409-refused PATCHes alike;
        ``refused=False`` keeps the accepted ones only, ``True`` the refused ones."""
        params = {} if refused is None else {"refused": str(refused).lower()}
        return self._call("GET", job_path(job_id, "writes/"), params=params)

    def stop_job(self, job_id: str) -> dict[str, Any]:
        """Stop (cancel) a job: PENDING/QUEUED/RUNNING -> STOPPED; 409 if it is final."""
        return self._call("POST", job_path(job_id, "stop/"))

    def write_summary(self, job_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """``{job_id: {"status", "writes", "final_writes", "refused", "refused_final"}}``
        for the jobs listed (or all); ``writes``/``final_writes`` count accepted PATCHes."""
        return self._call("POST", "_admin/writes/summary/", json=job_ids)

    def outcomes(self, job_ids: list[str]) -> Outcomes:
        """The jobs' outcomes (``Outcomes``), from one ``write_summary`` call."""
        summary = self.write_summary(job_ids)
        out = Outcomes(submitted=len(job_ids))
        for job_id in job_ids:
            s = summary.get(job_id, {"status": "MISSING", "final_writes": 0})
            if s["status"] == "SUCCEEDED":
                out.succeeded += 1
            elif s["status"] == "FAILED":
                out.failed += 1
                out.failed_ids.append(job_id)
            elif s["status"] == "STOPPED":
                out.stopped += 1
            else:
                out.not_final += 1
            if s["final_writes"] + s.get("refused_final", 0) > 1:
                out.written_twice += 1
        return out

    def logs(self, job_id: str | None = None) -> list[dict[str, Any]]:
        params = {"job": job_id} if job_id is not None else {}
        return self._call("GET", "_admin/logs/", params=params)

    def faults(self) -> dict[str, Any]:
        return self._call("GET", "_admin/faults/")

    def set_faults(self, rules: list[dict[str, Any]], seed: int | None = None) -> dict[str, Any]:
        """Replace all fault rules (see ``faults.FaultRule``)."""
        return self._call("PUT", "_admin/faults/", json={"rules": rules, "seed": seed})

    def clear_faults(self) -> dict[str, Any]:
        return self._call("DELETE", "_admin/faults/")

    def requests(self) -> list[dict[str, str]]:
        """The public API's requests as they arrived, oldest first: ``[{"method", "path"}]``."""
        return self._call("GET", "_admin/requests/")

    def clear_requests(self) -> None:
        self._call("DELETE", "_admin/requests/")

    def stats(self) -> dict[str, Any]:
        """Jobs by status, PATCH counts (``patches`` accepted, ``patches_refused``),
        downloads (total, per model), model GETs per model."""
        return self._call("GET", "_admin/stats/")

    def reset_stats(self) -> dict[str, Any]:
        return self._call("DELETE", "_admin/stats/")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
