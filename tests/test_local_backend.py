"""local_backend over real HTTP: a real subprocess, real SQLite, no mocks.

One backend process serves the module; the restart test runs its own. Each test that
needs isolation makes its own jobs (ids from uuid) or tenant, so the order of tests
does not matter.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from local_backend.cli import backend as backend_cli
from local_backend.client import AdminClient, auth_headers
from local_backend.db import Database
from local_backend.server import BackendProcess

ADMIN = "test-admin-token"
ALICE, CAROL, BOB, SVC, PAGER = "tok-alice", "tok-carol", "tok-bob", "tok-svc", "tok-pager"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def make_model_sources(root: Path) -> dict[str, Path]:
    """A model directory, a .tar.gz and a .zip of small fake artifacts."""
    model_dir = root / "model-dir"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (model_dir / "sub" / "config.yaml").write_text("labels: [cat, dog]\n")
    tgz = root / "model.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(model_dir, arcname=".")
    zpath = root / "model.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("weights.bin", b"\x01" * 1000)
    return {"dir": model_dir, "tgz": tgz, "zip": zpath}


def seed_spec(src: dict[str, Path]) -> dict[str, Any]:
    return {
        "tenants": ["acme", "globex", "paging"],
        "users": [
            {"name": "alice", "token": ALICE, "tenants": ["acme"]},
            {"name": "carol", "token": CAROL, "tenants": ["acme"]},
            {"name": "bob", "token": BOB, "tenants": ["globex"]},
            {"name": "pager", "token": PAGER, "tenants": ["paging"]},
            {"name": "svc", "token": SVC, "service": True},
        ],
        "models": [
            {"id": 12, "name": "resnet-tiny", "tenant": "acme", "version": 3,
             "directory": str(src["dir"])},
            {"id": 13, "name": "private", "tenant": "acme", "archive": str(src["tgz"]),
             "grants": ["alice"]},
            {"id": 14, "name": "no-file", "tenant": "globex"},
            {"id": 15, "name": "zipped", "tenant": "acme", "archive": str(src["zip"])},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_sources(tmp_path_factory.mktemp("model-src"))


@pytest.fixture(scope="module")
def backend(
    tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]
) -> Iterator[BackendProcess]:
    with BackendProcess(tmp_path_factory.mktemp("backend"), admin_token=ADMIN) as proc:
        with proc.admin() as admin:
            admin.seed(seed_spec(sources))
        yield proc


@pytest.fixture(scope="module")
def admin(backend: BackendProcess) -> Iterator[AdminClient]:
    with backend.admin() as client:
        yield client


@pytest.fixture(scope="module")
def http(backend: BackendProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=backend.url, timeout=10.0) as client:
        yield client


@pytest.fixture
def faults(admin: AdminClient) -> Iterator[AdminClient]:
    """The admin client, with fault rules cleared after the test whatever happens."""
    admin.clear_faults()
    yield admin
    admin.clear_faults()


def new_job(admin: AdminClient, tenant: str = "acme", **fields: Any) -> dict[str, Any]:
    return admin.create_job(tenant=tenant, params={"model": 12, "json": {"x": 1}}, **fields)


# -- health and admin auth ------------------------------------------------------------


def test_health_needs_no_auth(http: httpx.Client) -> None:
    assert http.get("/health/").json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Synapse-Admin-Token": "wrong"}])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/_admin/stats/", None),
        ("PUT", "/_admin/faults/", {"rules": [{"outage": True}]}),
        ("POST", "/_admin/seed/", {"tenants": ["evil"]}),
        ("POST", "/_admin/jobs/", [{"tenant": "acme"}]),
        ("GET", "/_admin/logs/", None),
    ],
)
def test_admin_token_required(
    http: httpx.Client, headers: dict[str, str], method: str, path: str, body: Any
) -> None:
    assert http.request(method, path, json=body, headers=headers).status_code == 401
    assert http.get("/models/12/", headers=auth_headers(ALICE)).status_code == 200  # no outage


# -- user auth --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Token nope"},
        {"Synapse-Access-Token": "Token nope"},
        {"Authorization": f"Bearer {ALICE}"},
        {"Synapse-Tenant": "Token acme"},
    ],
    ids=["missing", "unknown-authorization", "unknown-synapse", "wrong-scheme", "tenant-only"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models/12/"),
        ("GET", "/files/models/12.tar.gz"),
        ("GET", "/jobs/"),
        ("PATCH", "/jobs/whatever/"),
        ("POST", "/logs/"),
    ],
)
def test_401_without_a_valid_token(
    http: httpx.Client, headers: dict[str, str], method: str, path: str
) -> None:
    r = http.request(method, path, headers=headers, json={"message": "x"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Token"


@pytest.mark.parametrize("header", ["Authorization", "Synapse-Access-Token"])
def test_either_token_header_works(http: httpx.Client, header: str) -> None:
    r = http.get("/models/12/", headers={header: f"Token {ALICE}", "Synapse-Tenant": "Token acme"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("token", "tenant", "path"),
    [
        (BOB, None, "/models/12/"),  # another tenant's model
        (BOB, "globex", "/models/12/"),
        (BOB, None, "/files/models/12.tar.gz"),
        (CAROL, None, "/models/13/"),  # tenant member without a grant
        (CAROL, "acme", "/files/models/13.tar.gz"),
        (ALICE, "globex", "/models/12/"),  # tenant header: not a member
        (ALICE, "globex", "/jobs/"),
        (ALICE, "no-such-tenant", "/jobs/"),
        (SVC, "globex", "/models/12/"),  # service user, but the model is not in that tenant
    ],
)
def test_403_without_access(http: httpx.Client, token: str, tenant: str | None, path: str) -> None:
    assert http.get(path, headers=auth_headers(token, tenant)).status_code == 403


def test_404_for_unknown_objects(http: httpx.Client) -> None:
    h = auth_headers(ALICE)
    assert http.get("/models/999/", headers=h).status_code == 404
    assert http.get("/models/abc/", headers=h).status_code == 404
    assert http.get("/files/models/12.zip", headers=h).status_code == 404
    assert http.get("/jobs/no-such-job/", headers=h).status_code == 404


def test_jobs_of_another_tenant_are_forbidden(http: httpx.Client, admin: AdminClient) -> None:
    job = new_job(admin, tenant="globex")
    assert http.get(f"/jobs/{job['id']}/", headers=auth_headers(ALICE)).status_code == 403
    r = http.patch(f"/jobs/{job['id']}/", headers=auth_headers(ALICE), json={"status": "RUNNING"})
    assert r.status_code == 403
    assert http.get(f"/jobs/{job['id']}/", headers=auth_headers(BOB)).status_code == 200
    assert admin.writes(job["id"]) == []


# -- models -----------------------------------------------------------------------------


def test_model_json_and_download_match_checksum(
    http: httpx.Client, admin: AdminClient, backend: BackendProcess
) -> None:
    before = admin.stats()
    h = auth_headers(ALICE, "acme")
    model = http.get("/models/12/", headers=h).json()
    assert set(model) == {"id", "name", "tenant", "file", "checksum", "size", "version"}
    assert model["id"] == 12
    assert model["name"] == "resnet-tiny"
    assert model["tenant"] == "acme"
    assert model["version"] == 3
    assert model["file"] == f"{backend.url}/files/models/12.tar.gz"
    assert model["checksum"].startswith("sha256:")

    assert http.get(model["file"]).status_code == 401  # the download needs the auth headers
    data = http.get(model["file"], headers=h).content
    assert sha256(data) == model["checksum"]
    assert len(data) == model["size"]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert {"weights.bin", "sub/config.yaml"} <= set(tar.getnames())
        member = tar.extractfile("weights.bin")
        assert member is not None and member.read() == bytes(range(256)) * 40

    after = admin.stats()
    assert after["downloads"] == before["downloads"] + 1
    assert after["downloads_by_model"]["12"] == before["downloads_by_model"].get("12", 0) + 1
    assert after["model_gets"]["12"] == before["model_gets"].get("12", 0) + 1


def test_archive_models_keep_their_bytes_and_grants(
    http: httpx.Client, sources: dict[str, Path]
) -> None:
    for model_id, src, ext in [(13, sources["tgz"], "tar.gz"), (15, sources["zip"], "zip")]:
        model = http.get(f"/models/{model_id}/", headers=auth_headers(ALICE)).json()
        assert model["file"].endswith(f"/files/models/{model_id}.{ext}")
        assert model["checksum"] == sha256(src.read_bytes())
        assert http.get(model["file"], headers=auth_headers(ALICE)).content == src.read_bytes()
    assert http.get("/models/15/", headers=auth_headers(CAROL)).status_code == 200  # no grants


def test_model_without_file(http: httpx.Client) -> None:
    model = http.get("/models/14/", headers=auth_headers(BOB, "globex")).json()
    assert model["file"] is None
    assert model["checksum"] is None


def test_service_user_acts_in_every_tenant(http: httpx.Client) -> None:
    assert http.get("/models/14/", headers=auth_headers(SVC)).status_code == 200
    assert http.get("/models/13/", headers=auth_headers(SVC, "acme")).status_code == 200
    assert http.get("/jobs/", headers=auth_headers(SVC, "globex")).status_code == 200


# -- jobs -------------------------------------------------------------------------------


def test_job_list_pagination_and_filters(http: httpx.Client, admin: AdminClient) -> None:
    pending = [new_job(admin, tenant="paging")["id"] for _ in range(7)]
    running = [new_job(admin, tenant="paging", status="RUNNING")["id"] for _ in range(2)]
    train = new_job(admin, tenant="paging", action="train")["id"]
    h = auth_headers(PAGER, "paging")

    seen: list[str] = []
    url: str | None = "/jobs/?status=PENDING&action=inference&page_size=3"
    pages = 0
    while url is not None:
        body = http.get(url, headers=h).json()
        assert body["count"] == 7
        assert all(j["status"] == "PENDING" and j["tenant"] == "paging" for j in body["results"])
        seen += [j["id"] for j in body["results"]]
        url = body["next"]
        if url is not None:
            assert url.startswith(f"{http.base_url}".rstrip("/") + "/jobs/?")
        pages += 1
    assert pages == 3
    assert seen == pending  # creation order, nothing lost or repeated

    def ids(query: str, headers: dict[str, str] = h) -> list[str]:
        return [j["id"] for j in http.get(f"/jobs/{query}", headers=headers).json()["results"]]

    assert ids("?status=RUNNING") == running
    assert ids("?action=train") == [train]
    assert ids("") == [*pending, *running, train]
    assert ids("", auth_headers(SVC, "paging")) == [*pending, *running, train]
    assert set(pending) <= set(ids("?page_size=1000", auth_headers(SVC)))  # all tenants
    assert not set(pending) & set(ids("?page_size=1000", auth_headers(ALICE)))  # not hers

    assert http.get("/jobs/?page_size=3&page=5", headers=h).status_code == 404
    assert http.get("/jobs/?status=DONE", headers=h).status_code == 400


def test_patch_updates_and_write_log(http: httpx.Client, admin: AdminClient) -> None:
    job = new_job(admin, plugin_release={"code": "image-classifier", "version": "1.2.0"})
    assert job["status"] == "PENDING"
    assert job["meta"] == {}
    path, h = f"/jobs/{job['id']}/", auth_headers(ALICE, "acme")
    patches_before = admin.stats()["patches"]

    r = http.patch(path, headers=h, json={"status": "RUNNING", "progress_record": {"done": 1}})
    assert r.status_code == 200
    assert r.json()["status"] == "RUNNING"
    assert r.json()["progress_record"] == {"done": 1}
    final = {"status": "SUCCEEDED", "result": [{"label": "cat"}], "metrics_record": {"ms": 3}}
    r = http.patch(path, headers=h, json=final)
    assert r.status_code == 200

    got = http.get(path, headers=h).json()
    assert got["status"] == "SUCCEEDED"
    assert got["result"] == [{"label": "cat"}]
    assert got["progress_record"] == {"done": 1}
    assert got["plugin_release"] == {"code": "image-classifier", "version": "1.2.0"}
    assert got["updated"] > got["created"]

    r = http.patch(path, headers=h, json={"status": "FAILED", "bogus": 1, "other": 2})
    assert r.status_code == 400
    assert "bogus" in r.json()["detail"]
    assert set(r.json()["fields"]) == {"bogus", "other"}
    r = http.patch(path, headers=h, json={"status": "DONE"})
    assert r.status_code == 400
    assert "status" in r.json()["fields"]
    assert http.patch(path, headers=h, json=["status"]).status_code == 400

    writes = admin.writes(job["id"])
    assert [w["status"] for w in writes] == ["RUNNING", "SUCCEEDED"]  # rejected ones: no entry
    assert writes[1]["body"] == final
    assert writes[0]["time"] < writes[1]["time"]
    assert admin.job(job["id"])["status"] == "SUCCEEDED"
    assert admin.stats()["patches"] == patches_before + 2


def test_admin_create_jobs(admin: AdminClient) -> None:
    jid = uuid.uuid4().hex
    created = admin.create_jobs([{"id": jid, "tenant": "acme"}, {"tenant": "acme"}])
    assert created[0]["id"] == jid
    assert len(created[1]["id"]) == 32
    assert all(j["status"] == "PENDING" and j["action"] == "inference" for j in created)
    with pytest.raises(httpx.HTTPStatusError) as err:
        admin.create_jobs([{"id": jid, "tenant": "acme"}])
    assert err.value.response.status_code == 409
    with pytest.raises(httpx.HTTPStatusError) as err:
        admin.create_jobs([{"tenant": "acme", "status": "NOPE"}])
    assert err.value.response.status_code == 400


def test_logs(http: httpx.Client, admin: AdminClient) -> None:
    job = new_job(admin)
    h = auth_headers(ALICE, "acme")
    one = {"job": job["id"], "level": "info", "message": "started", "data": {"n": 1}}
    assert http.post("/logs/", headers=h, json=one).status_code == 201
    many = [
        {"job": job["id"], "message": "a"},
        {"job": job["id"], "level": "error", "message": "b"},
    ]
    assert http.post("/logs/", headers=h, json=many).status_code == 201
    logs = admin.logs(job["id"])
    assert [(e["level"], e["message"]) for e in logs] == [
        ("info", "started"),
        ("info", "a"),
        ("error", "b"),
    ]
    assert logs[0]["data"] == {"n": 1}
    assert http.post("/logs/", headers=h, json={"job": "nope", "message": "x"}).status_code == 400
    r = http.post("/logs/", headers=auth_headers(BOB), json={"job": job["id"], "message": "x"})
    assert r.status_code == 403


# -- status rule: forward only, nothing over a final status --------------------------------


def patch(http: httpx.Client, job_id: str, body: Any) -> httpx.Response:
    return http.patch(f"/jobs/{job_id}/", headers=auth_headers(ALICE, "acme"), json=body)


def test_patch_over_stopped_is_refused_and_logged(http: httpx.Client, admin: AdminClient) -> None:
    job_id = new_job(admin)["id"]
    stats_before = admin.stats()
    assert (
        patch(http, job_id, {"status": "RUNNING", "progress_record": {"done": 1}}).status_code
        == 200
    )
    assert patch(http, job_id, {"status": "STOPPED"}).status_code == 200  # a user cancels

    attempts = [
        {"status": "RUNNING"},
        {"status": "SUCCEEDED", "result": [{"label": "cat"}]},
        {"progress_record": {"done": 2}},  # no status: refused all the same
        {"status": "STOPPED"},  # not even the same final status again
    ]
    for body in attempts:
        r = patch(http, job_id, body)
        assert r.status_code == 409, body
        assert r.json()["status"] == "STOPPED"
        assert r.json()["detail"].startswith("job is STOPPED;")
    r = patch(http, job_id, {"status": "RUNNING"})
    assert r.json() == {"detail": "job is STOPPED; RUNNING refused", "status": "STOPPED"}

    job = admin.job(job_id)
    assert job["status"] == "STOPPED"
    assert job["result"] is None
    assert job["progress_record"] == {"done": 1}

    writes = admin.writes(job_id)
    assert [(w["refused"], w["code"], w["status"]) for w in writes] == [
        (False, 200, "RUNNING"),
        (False, 200, "STOPPED"),
        *[(True, 409, "STOPPED")] * 5,
    ]
    assert [w["body"] for w in writes[2:6]] == attempts
    assert all(w["user"] == "alice" for w in writes)
    assert [w["seq"] for w in admin.writes(job_id, refused=False)] == [w["seq"] for w in writes[:2]]
    assert [w["seq"] for w in admin.writes(job_id, refused=True)] == [w["seq"] for w in writes[2:]]

    summary = admin.write_summary([job_id])[job_id]
    assert summary == {
        "status": "STOPPED",
        "writes": 2,  # accepted only, as before
        "final_writes": 1,
        "refused": 5,
        "refused_final": 2,  # the SUCCEEDED and the second STOPPED
    }
    stats = admin.stats()
    assert stats["patches"] == stats_before["patches"] + 2
    assert stats["patches_refused"] == stats_before["patches_refused"] + 5


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (["FAILED"], "SUCCEEDED"),
        (["RUNNING", "SUCCEEDED"], "RUNNING"),
        (["SUCCEEDED"], "FAILED"),
        (["SUCCEEDED"], "SUCCEEDED"),
        (["RUNNING"], "PENDING"),
        (["RUNNING"], "QUEUED"),
        (["QUEUED"], "PENDING"),
    ],
)
def test_backward_or_over_final_is_refused(
    http: httpx.Client, admin: AdminClient, first: list[str], then: str
) -> None:
    job_id = new_job(admin)["id"]
    for status in first:
        assert patch(http, job_id, {"status": status}).status_code == 200
    current = first[-1]
    r = patch(http, job_id, {"status": then, "result": {"late": True}})
    assert r.status_code == 409
    assert r.json() == {"detail": f"job is {current}; {then} refused", "status": current}
    job = admin.job(job_id)
    assert job["status"] == current
    assert job["result"] is None
    last = admin.writes(job_id)[-1]
    assert last["refused"] is True and last["code"] == 409 and last["body"]["status"] == then
    assert len(admin.writes(job_id, refused=False)) == len(first)


@pytest.mark.parametrize(
    "path",
    [
        ["QUEUED", "RUNNING", "SUCCEEDED"],
        ["SUCCEEDED"],  # skipping forward
        ["FAILED"],
        ["QUEUED", "FAILED"],
        ["PENDING", "QUEUED", "QUEUED", "RUNNING", "RUNNING", "STOPPED"],  # staying is fine
        ["STOPPED"],
        ["QUEUED", "STOPPED"],
    ],
)
def test_forward_moves_are_accepted(
    http: httpx.Client, admin: AdminClient, path: list[str]
) -> None:
    job_id = new_job(admin)["id"]
    for i, status in enumerate(path):
        r = patch(http, job_id, {"status": status, "progress_record": {"step": i}})
        assert r.status_code == 200, (status, r.text)
        assert r.json()["status"] == status
    assert admin.job(job_id)["progress_record"] == {"step": len(path) - 1}
    assert admin.write_summary([job_id])[job_id]["refused"] == 0
    # progress without a status while not final is fine too (checked on a fresh job)
    other = new_job(admin)["id"]
    assert patch(http, other, {"progress_record": {"done": 3}}).status_code == 200


@pytest.mark.parametrize("before", [[], ["QUEUED"], ["RUNNING"]])
def test_admin_stop_from_any_live_status(
    http: httpx.Client, admin: AdminClient, before: list[str]
) -> None:
    job_id = new_job(admin)["id"]
    for status in before:
        assert patch(http, job_id, {"status": status}).status_code == 200
    assert admin.stop_job(job_id)["status"] == "STOPPED"
    last = admin.writes(job_id)[-1]
    assert (last["body"], last["user"], last["refused"]) == ({"status": "STOPPED"}, "_admin", False)
    assert patch(http, job_id, {"status": "SUCCEEDED"}).status_code == 409  # the worker, late

    with pytest.raises(httpx.HTTPStatusError) as err:
        admin.stop_job(job_id)  # already final: refused like any other write
    assert err.value.response.status_code == 409
    assert err.value.response.json()["status"] == "STOPPED"
    summary = admin.write_summary([job_id])[job_id]
    assert (summary["final_writes"], summary["refused"], summary["refused_final"]) == (1, 2, 2)


def test_outcomes_count_each_job_once_and_a_second_final_write(
    http: httpx.Client, admin: AdminClient
) -> None:
    """What the fault tests and benches count with: a refused second final write counts."""
    ids = {name: new_job(admin)["id"] for name in ("ok", "twice", "failed", "stopped", "open")}
    assert patch(http, ids["ok"], {"status": "SUCCEEDED"}).status_code == 200
    assert patch(http, ids["twice"], {"status": "SUCCEEDED"}).status_code == 200
    assert patch(http, ids["twice"], {"status": "FAILED"}).status_code == 409
    assert patch(http, ids["failed"], {"status": "FAILED"}).status_code == 200
    admin.stop_job(ids["stopped"])
    assert patch(http, ids["open"], {"status": "RUNNING"}).status_code == 200
    o = admin.outcomes([*ids.values(), "never-created"])
    assert (o.submitted, o.succeeded, o.failed, o.stopped, o.not_final) == (6, 2, 1, 1, 2)
    assert (o.final, o.written_twice, o.failed_ids) == (4, 1, [ids["failed"]])


def test_admin_stop_of_a_finished_job_is_refused(http: httpx.Client, admin: AdminClient) -> None:
    job_id = new_job(admin)["id"]
    assert patch(http, job_id, {"status": "SUCCEEDED", "result": [1]}).status_code == 200
    with pytest.raises(httpx.HTTPStatusError) as err:
        admin.stop_job(job_id)
    assert err.value.response.status_code == 409
    assert err.value.response.json() == {
        "detail": "job is SUCCEEDED; STOPPED refused",
        "status": "SUCCEEDED",
    }
    assert admin.job(job_id)["status"] == "SUCCEEDED"
    with pytest.raises(httpx.HTTPStatusError) as err:
        admin.stop_job("no-such-job")
    assert err.value.response.status_code == 404


def test_bad_body_is_400_before_409(http: httpx.Client, admin: AdminClient) -> None:
    job_id = new_job(admin, status="SUCCEEDED")["id"]
    assert patch(http, job_id, {"status": "DONE"}).status_code == 400
    assert patch(http, job_id, {"bogus": 1}).status_code == 400
    assert admin.writes(job_id) == []  # 400s are not attempts at a write


def test_old_store_gains_the_write_log_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE job_writes (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,"
        " time TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL);"
        "INSERT INTO job_writes(job_id, time, body, status)"
        " VALUES ('j1', '2024-01-01T00:00:00Z', '{\"status\": \"RUNNING\"}', 'RUNNING');"
    )
    conn.close()
    db = Database(path)
    try:
        db.insert_job({"id": "j1", "status": "RUNNING", "tenant": "acme", "action": "inference"})
        db.patch_job("j1", {"status": "FAILED"}, user="svc")
        writes = db.job_writes("j1")
        assert [(w["status"], w["refused"], w["code"], w["user"]) for w in writes] == [
            ("RUNNING", False, 200, None),
            ("FAILED", False, 200, "svc"),
        ]
        assert db.write_summary(["j1"])["j1"]["final_writes"] == 1
    finally:
        db.close()


# -- faults -----------------------------------------------------------------------------


def test_fault_error_rate_only_on_matching_path(http: httpx.Client, faults: AdminClient) -> None:
    job = new_job(faults)
    path, h = f"/jobs/{job['id']}/", auth_headers(ALICE)
    faults.set_faults([{"path_prefix": "jobs/", "methods": ["PATCH"], "error_rate": 1.0}])
    for _ in range(5):
        r = http.patch(path, headers=h, json={"status": "RUNNING"})
        assert r.status_code == 500
    assert http.get(path, headers=h).status_code == 200  # GET on the same path: not matched
    assert http.get("/models/12/", headers=h).status_code == 200
    assert faults.faults()["rules"][0]["hits"] == 5
    assert faults.writes(job["id"]) == []  # a faulted request never reaches the store

    faults.clear_faults()
    assert http.patch(path, headers=h, json={"status": "RUNNING"}).status_code == 200


def test_fault_error_status_and_limit(http: httpx.Client, faults: AdminClient) -> None:
    faults.set_faults(
        [{"path_prefix": "/models/", "error_rate": 1, "error_status": 502, "limit": 2}]
    )
    codes = [http.get("/models/12/", headers=auth_headers(ALICE)).status_code for _ in range(4)]
    assert codes == [502, 502, 200, 200]


def test_fault_latency_is_added_without_blocking_others(
    http: httpx.Client, faults: AdminClient, backend: BackendProcess
) -> None:
    h = auth_headers(ALICE)
    faults.set_faults([{"path_prefix": "models/", "latency_ms": 800}])
    slow: dict[str, Any] = {}

    def slow_call() -> None:
        t0 = time.monotonic()
        with httpx.Client(timeout=10) as c:
            slow["status"] = c.get(f"{backend.url}/models/12/", headers=h).status_code
        slow["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=slow_call)
    thread.start()
    wait_for(lambda: faults.faults()["rules"][0]["hits"] == 1, what="the slow request")
    t0 = time.monotonic()
    assert http.get("/jobs/", headers=h).status_code == 200
    fast = time.monotonic() - t0
    thread.join(10)
    assert slow["status"] == 200
    assert slow["elapsed"] >= 0.8
    assert fast < 0.4  # served while the slow one was sleeping


def test_fault_outage_spares_admin_and_health(http: httpx.Client, faults: AdminClient) -> None:
    faults.set_faults([{"path_prefix": "", "outage": True}])
    h = auth_headers(ALICE)
    for path in ["/models/12/", "/jobs/", "/files/models/12.tar.gz"]:
        r = http.get(path, headers=h)
        assert r.status_code == 503
        assert r.headers["synapse-fault"] == "outage"
    assert http.get("/health/").status_code == 200
    assert faults.stats()["jobs_total"] > 0
    faults.clear_faults()
    assert http.get("/models/12/", headers=h).status_code == 200


def test_fault_drop_closes_the_connection(
    http: httpx.Client, faults: AdminClient, backend: BackendProcess
) -> None:
    job = new_job(faults)
    h = auth_headers(ALICE)
    faults.set_faults([{"path_prefix": "jobs/", "drop_rate": 1.0}])
    with httpx.Client(base_url=backend.url, timeout=5) as fresh:
        for _ in range(2):
            with pytest.raises(httpx.TransportError):
                fresh.patch(f"/jobs/{job['id']}/", headers=h, json={"status": "RUNNING"})
        assert fresh.get("/models/12/", headers=h).status_code == 200
    assert faults.writes(job["id"]) == []
    faults.clear_faults()
    assert http.get(f"/jobs/{job['id']}/", headers=h).status_code == 200


def test_fault_rules_are_validated(faults: AdminClient) -> None:
    with pytest.raises(httpx.HTTPStatusError) as err:
        faults.set_faults([{"path_prefix": "jobs/", "error_rate": 2}])
    assert err.value.response.status_code == 400
    with pytest.raises(httpx.HTTPStatusError):
        faults.set_faults([{"path": "jobs/"}])  # unknown key
    assert faults.faults()["rules"] == []


def test_fault_max_body_bytes_answers_413(
    http: httpx.Client, faults: AdminClient, backend: BackendProcess
) -> None:
    job_id = new_job(faults)["id"]
    h = auth_headers(ALICE, "acme")
    faults.set_faults([{"path_prefix": "jobs/", "methods": ["PATCH"], "max_body_bytes": 200}])

    big = json.dumps({"status": "SUCCEEDED", "result": "x" * 500}).encode()
    r = http.patch(
        f"/jobs/{job_id}/", headers={**h, "Content-Type": "application/json"}, content=big
    )
    assert r.status_code == 413
    assert r.headers["synapse-fault"] == "too-large"
    assert r.json()["size"] == len(big)
    assert r.json()["limit"] == 200
    assert f"{len(big)} bytes" in r.json()["detail"]
    assert "200 bytes" in r.json()["detail"]

    # chunked (no Content-Length): counted as read
    r = http.patch(
        f"/jobs/{job_id}/",
        headers={**h, "Content-Type": "application/json"},
        content=iter([big[:100], big[100:]]),
    )
    assert r.status_code == 413
    assert r.json()["size"] == len(big)
    assert faults.writes(job_id) == []  # the app never saw them
    assert faults.job(job_id)["status"] == "PENDING"

    # at the limit, and chunked under it: the body reaches the app intact
    exact = json.dumps({"status": "RUNNING", "meta": {"pad": ""}}).encode()
    exact = exact.replace(b'"pad": ""', b'"pad": "' + b"p" * (200 - len(exact)) + b'"')
    assert len(exact) == 200
    r = http.patch(
        f"/jobs/{job_id}/", headers={**h, "Content-Type": "application/json"}, content=exact
    )
    assert r.status_code == 200, r.text
    small = b'{"progress_record": {"done": 7}}'
    r = http.patch(
        f"/jobs/{job_id}/",
        headers={**h, "Content-Type": "application/json"},
        content=iter([small[:5], small[5:]]),
    )
    assert r.status_code == 200, r.text
    assert r.json()["progress_record"] == {"done": 7}
    assert faults.faults()["rules"][0]["hits"] == 4
    # other methods are not limited by a PATCH rule
    assert http.get(f"/jobs/{job_id}/", headers=h).status_code == 200


def test_fault_non_json_2xx_answer(http: httpx.Client, faults: AdminClient) -> None:
    job_id = new_job(faults)["id"]
    faults.set_faults(
        [{"path_prefix": "jobs/", "methods": ["PATCH"], "non_json_rate": 1.0, "limit": 2}]
    )
    r = patch(http, job_id, {"status": "RUNNING"})
    assert r.status_code == 200
    assert r.headers["synapse-fault"] == "non-json"
    assert r.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        r.json()
    assert faults.job(job_id)["status"] == "RUNNING"  # served: the write happened
    assert len(faults.writes(job_id)) == 1

    # a non-2xx answer passes unchanged (still JSON), and counts as the rule's second hit
    assert patch(http, job_id, {"status": "PENDING"}).json()["status"] == "RUNNING"
    # past the limit: plain JSON again
    r = patch(http, job_id, {"status": "SUCCEEDED"})
    assert r.status_code == 200
    assert "synapse-fault" not in r.headers
    assert r.json()["status"] == "SUCCEEDED"
    assert faults.faults()["rules"][0]["hits"] == 2


def test_fault_non_json_rate_is_a_share(http: httpx.Client, faults: AdminClient) -> None:
    faults.set_faults([{"path_prefix": "models/", "non_json_rate": 0.5}], seed=7)
    h = auth_headers(ALICE)
    garbled = sum("synapse-fault" in http.get("/models/12/", headers=h).headers for _ in range(40))
    assert 5 <= garbled <= 35  # seeded; neither none nor all


@pytest.mark.parametrize(
    "rule",
    [
        {"non_json_rate": 1.5},
        {"non_json_rate": -0.1},
        {"max_body_bytes": -1},
        {"max_body": 10},
    ],
)
def test_new_fault_knobs_are_validated(faults: AdminClient, rule: dict[str, Any]) -> None:
    with pytest.raises(httpx.HTTPStatusError) as err:
        faults.set_faults([{"path_prefix": "jobs/", **rule}])
    assert err.value.response.status_code == 400
    assert faults.faults()["rules"] == []


# -- persistence, start options, CLI seed ----------------------------------------------------


def test_data_survives_restart_and_kill(tmp_path: Path, sources: dict[str, Path]) -> None:
    start_faults = [{"path_prefix": "unused/", "outage": True}]
    proc = BackendProcess(
        tmp_path / "data",
        admin_token=ADMIN,
        public_url="http://backend.example:9000/",
        faults=start_faults,
    )
    with proc, proc.admin() as admin:
        assert admin.faults()["rules"][0]["path_prefix"] == "unused/"  # faults given at start
        admin.seed(seed_spec(sources))
        job = new_job(admin)
        h = auth_headers(ALICE)
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            model = http.get("/models/12/", headers=h).json()
            assert model["file"] == "http://backend.example:9000/files/models/12.tar.gz"
            r = http.patch(f"/jobs/{job['id']}/", headers=h, json={"status": "SUCCEEDED"})
            assert r.status_code == 200
        url = proc.url

        proc.restart()
        assert proc.url == url
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            assert http.get("/models/12/", headers=h).json() == model
            assert http.get(f"/jobs/{job['id']}/", headers=h).json()["status"] == "SUCCEEDED"
        assert len(admin.writes(job["id"])) == 1

        proc.kill()
        assert not proc.running
        proc.start()
        assert admin.job(job["id"])["status"] == "SUCCEEDED"
        assert admin.stats()["patches"] == 1
    assert not proc.running
    assert "Uvicorn running" in proc.log_path.read_text()


def test_cli_seed_from_yaml_is_idempotent(tmp_path: Path, sources: dict[str, Path]) -> None:
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    (spec_dir / "model").symlink_to(sources["dir"], target_is_directory=True)
    spec = {
        "tenants": ["acme"],
        "users": [{"name": "alice", "token": "t1", "tenants": ["acme"]}],
        "models": [{"id": 7, "name": "m", "tenant": "acme", "directory": "model"}],
        "jobs": [{"id": "job-1", "tenant": "acme", "params": {"model": 7}}],
    }
    spec_file = spec_dir / "seed.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    data_dir = tmp_path / "data"
    runner = CliRunner()
    checksums = []
    for _ in range(2):
        result = runner.invoke(backend_cli, ["seed", str(spec_file), "--data-dir", str(data_dir)])
        assert result.exit_code == 0, result.output
        checksums.append(yaml.safe_load(result.output)["models"][0]["checksum"])
    assert checksums[0] == checksums[1]  # packing is reproducible

    db = Database.in_dir(data_dir)
    try:
        model = db.get_model(7)
        assert model is not None and model.checksum == checksums[0]
        user = db.user_for_token("t1")
        assert user is not None and user.tenants == {"acme"}
        assert db.list_jobs(tenants=None)[0] == 1
    finally:
        db.close()

    bad = spec_dir / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"id": 1, "name": "x", "tenant": "a",
                                               "archive": "missing.tar.gz"}]}))  # fmt: skip
    result = runner.invoke(backend_cli, ["seed", str(bad), "--data-dir", str(data_dir)])
    assert result.exit_code != 0
    assert "archive not found" in result.output
