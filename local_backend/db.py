"""The SQLite store of the local backend.

One file (``<data_dir>/backend.sqlite3``) in WAL mode, so data survives a restart (or a
SIGKILL: every write is committed before the HTTP answer goes out) and the ``seed`` CLI
can write while a server is reading. FastAPI runs our sync endpoints in a threadpool;
one connection guarded by a lock keeps that simple and correct (the load here is tiny),
and each :meth:`Database.tx` block is one transaction.

JSON-valued job fields are stored as JSON text; times are ISO 8601 UTC strings.

A job's status only moves forward (:func:`refusal` has the rule): PENDING -> QUEUED ->
RUNNING -> one of SUCCEEDED, FAILED, STOPPED, skipping forward allowed. Nothing is
written over a final status, and no status moves back. A refused PATCH changes nothing
but is still appended to the write log (``refused=1``, ``code=409``), so tests can count
every attempt; :meth:`Database.patch_job` raises :class:`TransitionRefused` after
committing that entry.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DB_FILE_NAME = "backend.sqlite3"

JOB_STATUSES = ("PENDING", "QUEUED", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
FINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
STATUS_RANK = {"PENDING": 0, "QUEUED": 1, "RUNNING": 2, "SUCCEEDED": 3, "FAILED": 3, "STOPPED": 3}
REFUSED_CODE = 409
JOB_JSON_FIELDS = (
    "plugin_release",
    "params",
    "result",
    "progress_record",
    "metrics_record",
    "console_logs",
    "meta",
)
JOB_WRITABLE_FIELDS = (
    "status",
    "progress_record",
    "metrics_record",
    "console_logs",
    "result",
    "meta",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    code TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    service INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS memberships (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    tenant TEXT NOT NULL REFERENCES tenants(code) ON DELETE CASCADE,
    PRIMARY KEY (user, tenant)
);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL REFERENCES tenants(code),
    version INTEGER NOT NULL DEFAULT 1,
    checksum TEXT,
    size INTEGER,
    file_name TEXT,
    file_url TEXT,
    access TEXT NOT NULL DEFAULT 'tenant' CHECK (access IN ('tenant', 'grants'))
);
CREATE TABLE IF NOT EXISTS model_grants (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    PRIMARY KEY (model_id, user)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    tenant TEXT NOT NULL REFERENCES tenants(code),
    action TEXT NOT NULL,
    plugin_release TEXT NOT NULL DEFAULT 'null',
    params TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT 'null',
    progress_record TEXT NOT NULL DEFAULT 'null',
    metrics_record TEXT NOT NULL DEFAULT 'null',
    console_logs TEXT NOT NULL DEFAULT 'null',
    meta TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant_status ON jobs (tenant, status, created);
CREATE TABLE IF NOT EXISTS job_writes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    time TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    refused INTEGER NOT NULL DEFAULT 0,
    code INTEGER NOT NULL DEFAULT 200,
    user TEXT
);
CREATE INDEX IF NOT EXISTS job_writes_by_job ON job_writes (job_id, seq);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT,
    time TEXT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT 'null',
    user TEXT
);
CREATE INDEX IF NOT EXISTS logs_by_job ON logs (job_id, seq);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


# Columns added to job_writes after the first release: (name, declaration), for old stores.
_JOB_WRITES_ADDED = (
    ("refused", "INTEGER NOT NULL DEFAULT 0"),
    ("code", "INTEGER NOT NULL DEFAULT 200"),
    ("user", "TEXT"),
)
_MODELS_ADDED = (("file_url", "TEXT"),)


class TransitionRefused(Exception):
    """A PATCH the status rule refuses; ``status`` is the job's current status."""

    def __init__(self, detail: str, status: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


def refusal(current: str, changes: dict[str, Any]) -> str | None:
    """Why a PATCH of ``changes`` on a job in ``current`` is refused, or None if allowed.

    Over a final status (SUCCEEDED, FAILED, STOPPED) every PATCH is refused, whatever it
    carries (status, result, progress_record, even an empty body). Otherwise a status may
    stay or move forward (PENDING -> QUEUED -> RUNNING -> final; skipping is allowed), and
    never back (RUNNING never replaces QUEUED's successors, PENDING never replaces RUNNING).
    """
    new = changes.get("status")
    if current in FINAL_STATUSES:
        what = new if new is not None else "a write of " + (", ".join(sorted(changes)) or "nothing")
        return f"job is {current}; {what} refused"
    if new is not None and STATUS_RANK[new] < STATUS_RANK.get(current, 0):
        return f"job is {current}; {new} refused"
    return None


def now_iso() -> str:
    """Current UTC time, ISO 8601 with microseconds and a ``Z`` (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class User:
    name: str
    service: bool
    tenants: frozenset[str]

    def can_act_in(self, tenant: str) -> bool:
        return self.service or tenant in self.tenants


@dataclass(frozen=True)
class Model:
    id: int
    name: str
    tenant: str
    version: int
    checksum: str | None
    size: int | None
    file_name: str | None
    file_url: str | None  # a file held elsewhere (another host), served as is
    access: str  # 'tenant' (all members) or 'grants' (explicit users)
    grants: frozenset[str]

    def allows(self, user: User) -> bool:
        """Whether ``user`` may read this model (tenant member + access rule)."""
        if user.service:
            return True
        if self.tenant not in user.tenants:
            return False
        return self.access == "tenant" or user.name in self.grants


class Database:
    """Thread-safe access to the store; create it once per process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._conn.executescript(SCHEMA)
            have = {r["name"] for r in self._conn.execute("PRAGMA table_info(job_writes)")}
            for name, decl in _JOB_WRITES_ADDED:
                if name not in have:  # a store made before the column existed
                    self._conn.execute(f"ALTER TABLE job_writes ADD COLUMN {name} {decl}")
            have = {r["name"] for r in self._conn.execute("PRAGMA table_info(models)")}
            for name, decl in _MODELS_ADDED:
                if name not in have:
                    self._conn.execute(f"ALTER TABLE models ADD COLUMN {name} {decl}")

    @classmethod
    def in_dir(cls, data_dir: Path) -> Database:
        return cls(Path(data_dir) / DB_FILE_NAME)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    # -- tenants, users, tokens -------------------------------------------------------

    def upsert_tenant(self, code: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR IGNORE INTO tenants(code) VALUES (?)", (code,))

    def tenant_exists(self, code: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM tenants WHERE code=?", (code,)).fetchone()
        return row is not None

    def upsert_user(
        self, name: str, tokens: Iterable[str], tenants: Iterable[str], service: bool
    ) -> None:
        """Create or replace a user: its memberships become exactly ``tenants``; the given
        tokens are (re)assigned to it (a token belongs to one user)."""
        tenants = list(tenants)
        with self.tx() as c:
            for t in tenants:
                c.execute("INSERT OR IGNORE INTO tenants(code) VALUES (?)", (t,))
            c.execute(
                "INSERT INTO users(name, service) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET service=excluded.service",
                (name, int(service)),
            )
            for tok in tokens:
                c.execute(
                    "INSERT INTO tokens(token, user) VALUES (?, ?) "
                    "ON CONFLICT(token) DO UPDATE SET user=excluded.user",
                    (tok, name),
                )
            c.execute("DELETE FROM memberships WHERE user=?", (name,))
            c.executemany(
                "INSERT INTO memberships(user, tenant) VALUES (?, ?)", [(name, t) for t in tenants]
            )

    def user_for_token(self, token: str) -> User | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT u.name, u.service FROM tokens t JOIN users u ON u.name = t.user "
                "WHERE t.token=?",
                (token,),
            ).fetchone()
            if row is None:
                return None
            tenants = self._conn.execute(
                "SELECT tenant FROM memberships WHERE user=?", (row["name"],)
            ).fetchall()
        return User(row["name"], bool(row["service"]), frozenset(r["tenant"] for r in tenants))

    def user_exists(self, name: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone()
        return row is not None

    # -- models -----------------------------------------------------------------------

    def upsert_model(
        self,
        *,
        id: int,
        name: str,
        tenant: str,
        version: int,
        checksum: str | None,
        size: int | None,
        file_name: str | None,
        grants: list[str] | None,
        file_url: str | None = None,
    ) -> None:
        """Create or replace model ``id``; ``grants=None`` means all tenant members."""
        access = "tenant" if grants is None else "grants"
        with self.tx() as c:
            c.execute("INSERT OR IGNORE INTO tenants(code) VALUES (?)", (tenant,))
            c.execute(
                "INSERT INTO models(id, name, tenant, version, checksum, size, file_name, "
                "file_url, access) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
                "SET name=excluded.name, tenant=excluded.tenant, version=excluded.version, "
                "checksum=excluded.checksum, size=excluded.size, file_name=excluded.file_name, "
                "file_url=excluded.file_url, access=excluded.access",
                (id, name, tenant, version, checksum, size, file_name, file_url, access),
            )
            c.execute("DELETE FROM model_grants WHERE model_id=?", (id,))
            c.executemany(
                "INSERT INTO model_grants(model_id, user) VALUES (?, ?)",
                [(id, u) for u in grants or []],
            )

    def get_model(self, model_id: int) -> Model | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
            if row is None:
                return None
            grants = self._conn.execute(
                "SELECT user FROM model_grants WHERE model_id=?", (model_id,)
            ).fetchall()
        return Model(
            id=row["id"],
            name=row["name"],
            tenant=row["tenant"],
            version=row["version"],
            checksum=row["checksum"],
            size=row["size"],
            file_name=row["file_name"],
            file_url=row["file_url"],
            access=row["access"],
            grants=frozenset(g["user"] for g in grants),
        )

    # -- jobs -------------------------------------------------------------------------

    @staticmethod
    def _job_from_row(row: sqlite3.Row) -> dict[str, Any]:
        job: dict[str, Any] = {
            "id": row["id"],
            "status": row["status"],
            "tenant": row["tenant"],
            "action": row["action"],
        }
        for f in JOB_JSON_FIELDS:
            job[f] = json.loads(row[f])
        job["created"] = row["created"]
        job["updated"] = row["updated"]
        return job

    def insert_job(self, job: dict[str, Any], *, upsert: bool = False) -> dict[str, Any]:
        """Insert a job (all fields given); with ``upsert`` an existing id is replaced
        (keeping its creation time). Raises ``sqlite3.IntegrityError`` on a duplicate id."""
        now = now_iso()
        cols = ["id", "status", "tenant", "action", *JOB_JSON_FIELDS, "created", "updated"]
        values = [
            job["id"],
            job["status"],
            job["tenant"],
            job["action"],
            *(json.dumps(job.get(f)) for f in JOB_JSON_FIELDS),
            now,
            now,
        ]
        sql = f"INSERT INTO jobs({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        if upsert:
            sql += " ON CONFLICT(id) DO UPDATE SET " + ", ".join(
                f"{c}=excluded.{c}" for c in cols if c not in ("id", "created")
            )
        with self.tx() as c:
            c.execute("INSERT OR IGNORE INTO tenants(code) VALUES (?)", (job["tenant"],))
            c.execute(sql, values)
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job["id"],)).fetchone()
        return self._job_from_row(row)

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else self._job_from_row(row)

    def list_jobs(
        self,
        *,
        tenants: Iterable[str] | None,
        status: str | None = None,
        action: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """Jobs in creation order, filtered; ``tenants=None`` means every tenant.
        Returns (total count, the requested slice)."""
        where: list[str] = []
        args: list[Any] = []
        if tenants is not None:
            tl = list(tenants)
            if not tl:
                return 0, []
            where.append(f"tenant IN ({', '.join('?' * len(tl))})")
            args.extend(tl)
        if status is not None:
            where.append("status=?")
            args.append(status)
        if action is not None:
            where.append("action=?")
            args.append(action)
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            count = self._conn.execute(f"SELECT COUNT(*) FROM jobs{cond}", args).fetchone()[0]
            sql = f"SELECT * FROM jobs{cond} ORDER BY created, rowid"
            page_args = list(args)
            if limit is not None:
                sql += " LIMIT ? OFFSET ?"
                page_args += [limit, offset]
            rows = self._conn.execute(sql, page_args).fetchall()
        return count, [self._job_from_row(r) for r in rows]

    def patch_job(
        self, job_id: str, changes: dict[str, Any], user: str | None = None
    ) -> dict[str, Any] | None:
        """Apply a validated PATCH body and append it to the job's write log, atomically.

        None when the job does not exist. When :func:`refusal` refuses it, nothing of the
        job changes, the attempt is logged (``refused=1``, ``code=409``, ``status`` = the
        current status) and :class:`TransitionRefused` is raised once that is committed.
        """
        now = now_iso()
        sets = ["updated=?"]
        args: list[Any] = [now]
        for field, value in changes.items():
            if field not in JOB_WRITABLE_FIELDS:
                raise ValueError(f"not writable: {field}")
            if field == "status" and value not in JOB_STATUSES:
                raise ValueError(f"unknown status: {value!r}")
            sets.append(f"{field}=?")
            args.append(value if field == "status" else json.dumps(value))
        refused: TransitionRefused | None = None
        with self.tx() as c:
            cur = c.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if cur is None:
                return None
            reason = refusal(cur["status"], changes)
            if reason is not None:
                refused = TransitionRefused(reason, cur["status"])
                row = None
                c.execute(
                    "INSERT INTO job_writes(job_id, time, body, status, refused, code, user) "
                    "VALUES (?, ?, ?, ?, 1, ?, ?)",
                    (job_id, now, json.dumps(changes), cur["status"], REFUSED_CODE, user),
                )
                self._bump(c, "patches_refused")
            else:
                c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", [*args, job_id])
                row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
                c.execute(
                    "INSERT INTO job_writes(job_id, time, body, status, refused, code, user) "
                    "VALUES (?, ?, ?, ?, 0, 200, ?)",
                    (job_id, now, json.dumps(changes), row["status"], user),
                )
                self._bump(c, "patches")
        if refused is not None:
            raise refused
        assert row is not None
        return self._job_from_row(row)

    def job_writes(self, job_id: str, refused: bool | None = None) -> list[dict[str, Any]]:
        """The job's write log, oldest first: accepted and refused PATCHes (``refused``
        True/False keeps only those). ``status`` is the job's status after the write (for
        a refused one: the status that refused it)."""
        sql = "SELECT seq, time, body, status, refused, code, user FROM job_writes WHERE job_id=?"
        args: list[Any] = [job_id]
        if refused is not None:
            sql += " AND refused=?"
            args.append(int(refused))
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        return [
            {
                "seq": r["seq"],
                "time": r["time"],
                "body": json.loads(r["body"]),
                "status": r["status"],
                "refused": bool(r["refused"]),
                "code": r["code"],
                "user": r["user"],
            }
            for r in rows
        ]

    def write_summary(self, job_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per job: its status; ``writes`` (accepted PATCHes) and ``final_writes`` (accepted
        ones that set a final status), as before refusals existed; ``refused`` (refused
        PATCHes) and ``refused_final`` (refused ones that tried to set a final status)."""
        final = "json_extract(w.body, '$.status') IN ('SUCCEEDED','FAILED','STOPPED')"
        query = (
            "SELECT j.id AS id, j.status AS status, "
            "SUM(CASE WHEN w.refused = 0 THEN 1 ELSE 0 END) AS writes, "
            f"SUM(CASE WHEN w.refused = 0 AND {final} THEN 1 ELSE 0 END) AS final_writes, "
            "SUM(CASE WHEN w.refused = 1 THEN 1 ELSE 0 END) AS refused, "
            f"SUM(CASE WHEN w.refused = 1 AND {final} THEN 1 ELSE 0 END) AS refused_final "
            "FROM jobs j LEFT JOIN job_writes w ON w.job_id = j.id"
        )
        params: list[Any] = []
        if job_ids is not None:
            query += f" WHERE j.id IN ({','.join('?' * len(job_ids))})"
            params = list(job_ids)
        query += " GROUP BY j.id"
        with self._lock:
            rows = self._conn.execute(query, params).fetchall() if job_ids != [] else []
        return {
            r["id"]: {
                "status": r["status"],
                "writes": r["writes"] or 0,
                "final_writes": r["final_writes"] or 0,
                "refused": r["refused"] or 0,
                "refused_final": r["refused_final"] or 0,
            }
            for r in rows
        }

    # -- logs -------------------------------------------------------------------------

    def add_logs(self, entries: list[dict[str, Any]], user: str | None) -> None:
        now = now_iso()
        with self.tx() as c:
            c.executemany(
                "INSERT INTO logs(job_id, time, level, message, data, user) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (e.get("job"), now, e["level"], e["message"], json.dumps(e.get("data")), user)
                    for e in entries
                ],
            )

    def logs(self, job_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM logs"
        args: tuple[Any, ...] = ()
        if job_id is not None:
            sql += " WHERE job_id=?"
            args = (job_id,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        return [
            {
                "seq": r["seq"],
                "job": r["job_id"],
                "time": r["time"],
                "level": r["level"],
                "message": r["message"],
                "data": json.loads(r["data"]),
                "user": r["user"],
            }
            for r in rows
        ]

    # -- counters and stats -----------------------------------------------------------

    @staticmethod
    def _bump(c: sqlite3.Connection, key: str, by: int = 1) -> None:
        c.execute(
            "INSERT INTO counters(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=value+excluded.value",
            (key, by),
        )

    def bump(self, *keys: str) -> None:
        with self.tx() as c:
            for k in keys:
                self._bump(c, k)

    def reset_counters(self) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM counters")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_status = dict.fromkeys(JOB_STATUSES, 0)
            for r in self._conn.execute("SELECT status, COUNT(*) n FROM jobs GROUP BY status"):
                by_status[r["status"]] = r["n"]
            counters = {
                r["key"]: r["value"] for r in self._conn.execute("SELECT key, value FROM counters")
            }
            n_logs = self._conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0]

        def per_model(prefix: str) -> dict[str, int]:
            return {k[len(prefix) :]: v for k, v in counters.items() if k.startswith(prefix)}

        return {
            "jobs": by_status,
            "jobs_total": sum(by_status.values()),
            "patches": counters.get("patches", 0),
            "patches_refused": counters.get("patches_refused", 0),
            "downloads": counters.get("downloads", 0),
            "downloads_by_model": per_model("downloads:"),
            "model_gets": per_model("model_gets:"),
            "logs": n_logs,
        }
