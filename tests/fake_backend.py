"""A small fake Synapse backend for the write-back's tests: a real HTTP server in a thread.

It holds jobs ``{id: {status, ...}}`` and a log of every request, and is scriptable per
test: answer a given status code for the next N requests, answer 2xx with a body that is
not JSON, answer slowly (a delay, or the body dribbled one byte at a time), refuse bodies
over a size with 413, refuse illegal status moves with 409 and the current status.

Only what the write-back uses: ``GET jobs/{id}/`` and ``PATCH jobs/{id}/``, and for the
intake ``GET jobs/`` (the list, paged as the local backend pages it). The
``local_backend`` is the faithful stand-in; this one is for faults it cannot be told to
make (a dribbled answer, a 2xx that is not JSON, a refusal of one given request).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
RANK = {"PENDING": 0, "QUEUED": 1, "RUNNING": 2, "SUCCEEDED": 3, "FAILED": 3, "STOPPED": 3}
WRITABLE = {"status", "progress_record", "metrics_record", "console_logs", "result", "meta"}


@dataclass
class Entry:
    """One request as the server saw it."""

    method: str
    path: str
    job_id: str | None
    tenant: str | None
    body: Any = None
    code: int | None = None  # what was answered (None while in flight)
    applied: bool = False  # a PATCH that changed the job
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None  # when the answer was out, or the client gone
    aborted: bool = False  # the client went away before the whole answer


@dataclass
class Rule:
    """What to do instead of the normal answer, for the next ``n`` matching requests."""

    method: str
    n: int
    job_id: str | None = None
    code: int | None = None  # answer this instead
    raw: bytes | None = None  # ...with this body (default: a JSON detail)
    content_type: str = "application/json"
    delay_s: float = 0.0  # before the answer starts
    byte_delay_s: float = 0.0  # between each byte of the answer (dribble)
    before: dict[str, Any] | None = None  # set these job fields first (a race, scripted)


class FakeBackend:
    """``with FakeBackend(token) as fake: BackendAPI(settings, base_url=fake.url)``."""

    def __init__(
        self, token: str, *, max_body_bytes: int | None = None, enforce: bool = True
    ) -> None:
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.enforce = enforce  # refuse illegal moves with 409 (off: accept anything)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.log: list[Entry] = []
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- scripting

    def add_job(
        self, job_id: str, status: str = "RUNNING", tenant: str = "acme", **fields: Any
    ) -> None:
        """A job; ``fields`` adds more of it (``action``, ``params``, ``plugin_release``)."""
        with self._lock:
            self.jobs[job_id] = {
                "id": job_id,
                "status": status,
                "tenant": tenant,
                "result": None,
                **fields,
            }

    def script(self, method: str, n: int = 1, **kw: Any) -> None:
        """For the next ``n`` requests of ``method`` (and ``job_id``, if given), do ``kw``."""
        with self._lock:
            self.rules.append(Rule(method=method, n=n, **kw))

    # -- reading what happened

    def status(self, job_id: str) -> str:
        with self._lock:
            return self.jobs[job_id]["status"]

    def entries(self, method: str | None = None, job_id: str | None = None) -> list[Entry]:
        with self._lock:
            return [
                e
                for e in self.log
                if (method is None or e.method == method) and (job_id is None or e.job_id == job_id)
            ]

    def applied(self, job_id: str) -> list[Entry]:
        return [e for e in self.entries("PATCH", job_id) if e.applied]

    # -- serving

    def _take_rule(self, method: str, job_id: str | None) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.method == method and rule.n > 0 and rule.job_id in (None, job_id):
                    rule.n -= 1
                    return rule
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_PATCH(self) -> None:
                fake._serve(self, "PATCH")

        return Handler

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = h.path.split("?")[0].strip("/").split("/")
        job_id = parts[1] if len(parts) == 2 and parts[0] == "jobs" else None
        tenant = h.headers.get("Synapse-Tenant", "").removeprefix("Token ") or None
        entry = Entry(method, h.path, job_id, tenant)
        with self._lock:
            self.log.append(entry)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        rule = self._take_rule(method, job_id)
        if rule is not None and rule.before and job_id in self.jobs:
            with self._lock:
                self.jobs[job_id].update(rule.before)
        code, answer, commit = self._answer(h, method, job_id, tenant, raw, entry)
        ctype = "application/json"
        if rule is not None and rule.code is not None:
            code, commit = rule.code, None
            answer = rule.raw if rule.raw is not None else json.dumps({"detail": "scripted"})
            answer = answer if isinstance(answer, bytes) else answer.encode()
            ctype = rule.content_type
        entry.code = code
        if rule is not None and rule.delay_s:
            time.sleep(rule.delay_s)
        try:
            h.send_response(code)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(answer)))
            h.end_headers()
            if rule is not None and rule.byte_delay_s:
                for i in range(len(answer)):
                    h.wfile.write(answer[i : i + 1])
                    h.wfile.flush()
                    time.sleep(rule.byte_delay_s)
            else:
                h.wfile.write(answer)
            h.wfile.flush()
        except OSError:  # the client went away: nothing is applied
            entry.aborted = True
            entry.ended = time.monotonic()
            h.close_connection = True
            return
        if commit is not None:  # applied once the whole answer is out, like a slow backend
            with self._lock:
                self.jobs[job_id].update(commit)
            entry.applied = True
        entry.ended = time.monotonic()

    def _answer(
        self,
        h: BaseHTTPRequestHandler,
        method: str,
        job_id: str | None,
        tenant: str | None,
        raw: bytes,
        entry: Entry,
    ) -> tuple[int, bytes, dict[str, Any] | None]:
        """The normal answer: (code, body, the change to apply once answered)."""

        def detail(code: int, text: str, **kw: Any) -> tuple[int, bytes, None]:
            return code, json.dumps({"detail": text, **kw}).encode(), None

        if h.headers.get("Authorization") != f"Token {self.token}":
            return detail(401, "Invalid token.")
        if method == "GET" and job_id is None and h.path.split("?")[0].strip("/") == "jobs":
            return self._list(h.path, tenant)
        with self._lock:
            job = dict(self.jobs[job_id]) if job_id in self.jobs else None
        if job is None or (tenant is not None and tenant != job["tenant"]):
            return detail(404, "Not found.")
        if method == "GET":
            return 200, json.dumps(job).encode(), None
        if self.max_body_bytes is not None and len(raw) > self.max_body_bytes:
            return detail(413, "Request body too large.")
        try:
            body = json.loads(raw)
        except ValueError:
            return detail(400, "JSON parse error.")
        entry.body = body
        if not isinstance(body, dict) or set(body) - WRITABLE:
            return detail(400, "Unknown field(s).")
        new = body.get("status")
        if self.enforce and (
            job["status"] in FINAL or (new is not None and RANK[new] < RANK[job["status"]])
        ):
            return detail(409, f"job is {job['status']}; refused", status=job["status"])
        return 200, json.dumps({**job, **body}).encode(), body

    # -- the job list (for the intake): ``GET jobs/``, added for tests/test_intake.py

    def _list(self, path: str, tenant: str | None) -> tuple[int, bytes, None]:
        """``GET jobs/?status=&action=&page_size=&page=``, paged like the local backend
        (DRF): ``next`` is an absolute URL or null, a page past the end is 404. A job
        without an ``action`` field counts as an inference job."""
        query = parse_qs(urlsplit(path).query)

        def arg(name: str, default: str | None = None) -> str | None:
            return query.get(name, [default])[0]

        status, action = arg("status"), arg("action")
        try:
            page_size, page = (
                max(1, int(arg("page_size", "100") or 100)),
                int(arg("page", "1") or 1),
            )
        except ValueError:
            return 404, json.dumps({"detail": "Invalid page."}).encode(), None
        with self._lock:
            matching = [
                dict(job)
                for job in self.jobs.values()
                if (status is None or job["status"] == status)
                and (action is None or job.get("action", "inference") == action)
                and (tenant is None or job["tenant"] == tenant)
            ]
        results = matching[(page - 1) * page_size : page * page_size]
        if page < 1 or (page > 1 and not results):
            return 404, json.dumps({"detail": "Invalid page."}).encode(), None
        params = {k: v[0] for k, v in query.items()}

        def page_url(n: int) -> str:
            return f"{self.url}/jobs/?{urlencode({**params, 'page': n})}"

        more = page * page_size < len(matching)
        answer = {
            "count": len(matching),
            "next": page_url(page + 1) if more else None,
            "previous": page_url(page - 1) if page > 1 else None,
            "results": results,
        }
        return 200, json.dumps(answer).encode(), None
