"""The seed spec (tenants, users with tokens, models with archives, jobs) and applying it.

Seeding is idempotent and declarative: tenants are created if missing, users are upserted
by name (their memberships become exactly the listed tenants; their tokens are assigned
to them), models by id (file, checksum and grants replaced), jobs by id (a job without an
id gets a fresh uuid4 hex, so only jobs with ids are idempotent). Tenants that users,
models or jobs name are created as needed.

A model's file is stored in the data dir (``files/models/<id>.<ext>``), so the store is
self-contained: an ``archive`` (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``) is copied, a
``directory`` is packed into a ``.tar.gz`` deterministically (sorted, zeroed times and
owners: packing the same directory twice gives the same checksum). ``checksum`` and
``size`` are computed from the stored bytes; a spec may give ``checksum`` itself to
force a wrong one (for tests of the checksum check). A ``file_url`` instead names a file
held elsewhere (another host, a pre-signed URL): answered as the model's ``file`` as is,
with the spec's ``checksum``. A model with none of them has no file.

Relative paths resolve against the YAML file's directory (``load_seed_file``) or the
current directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from local_backend.db import Database

JobStatus = Literal["PENDING", "QUEUED", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]

ARCHIVE_SUFFIXES = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar", ".zip": "zip"}


class UserSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    token: str | None = Field(None, min_length=1)
    tokens: list[str] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)
    service: bool = False

    def all_tokens(self) -> list[str]:
        return ([self.token] if self.token else []) + self.tokens


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int
    name: str
    tenant: str
    version: int = 1
    archive: Path | None = None
    directory: Path | None = None
    grants: list[str] | None = Field(None, description="user names; omitted: all members")
    checksum: str | None = Field(None, description="override the computed checksum")
    file_url: str | None = Field(
        None, description="the file is elsewhere (another host): its URL, given as is"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if sum(x is not None for x in (self.archive, self.directory, self.file_url)) > 1:
            raise ValueError("give one of 'archive', 'directory' or 'file_url'")
        return self


class JobSpec(BaseModel):
    """A job to create; the same shape as ``POST _admin/jobs/`` takes."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1)
    status: JobStatus = "PENDING"
    tenant: str
    action: str = "inference"
    plugin_release: dict[str, Any] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    result: Any = None
    progress_record: Any = None
    metrics_record: Any = None
    console_logs: Any = None
    meta: Any = Field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        data = self.model_dump()
        data["id"] = self.id or uuid.uuid4().hex
        return data


class SeedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[str] = Field(default_factory=list)
    users: list[UserSpec] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    jobs: list[JobSpec] = Field(default_factory=list)


def models_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "files" / "models"


def load_seed_file(path: Path) -> tuple[SeedSpec, Path]:
    """A spec from a YAML (or JSON) file, and the directory relative paths resolve from."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    return SeedSpec.model_validate(data), path.resolve().parent


def archive_ext(name: str) -> str:
    lower = name.lower()
    for suffix, ext in ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffix):
            return ext
    raise ValueError(f"unsupported archive type: {name!r} (use .zip, .tar or .tar.gz)")


def pack_directory(src: Path, dest: Path) -> None:
    """Pack ``src``'s contents into a reproducible ``.tar.gz`` at ``dest``."""
    if not src.is_dir():
        raise ValueError(f"not a directory: {src}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(src.rglob("*")):
            info = tar.gettarinfo(str(p), arcname=p.relative_to(src).as_posix())
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isfile():
                with p.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    with dest.open("wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def store_model_file(data_dir: Path, spec: ModelSpec, base_dir: Path) -> tuple[str, str, int]:
    """Copy or pack the model's file into the data dir; returns (file name, checksum, size).
    The file is written beside its final name and renamed, so a download in flight never
    sees half a file."""
    target_dir = models_dir(data_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    if spec.archive is not None:
        src = spec.archive if spec.archive.is_absolute() else base_dir / spec.archive
        if not src.is_file():
            raise ValueError(f"model {spec.id}: archive not found: {src}")
        file_name = f"{spec.id}.{archive_ext(src.name)}"
        tmp = target_dir / f".{file_name}.tmp"
        shutil.copyfile(src, tmp)
    else:
        assert spec.directory is not None
        src = spec.directory if spec.directory.is_absolute() else base_dir / spec.directory
        if not src.is_dir():
            raise ValueError(f"model {spec.id}: directory not found: {src}")
        file_name = f"{spec.id}.tar.gz"
        tmp = target_dir / f".{file_name}.tmp"
        pack_directory(src, tmp)
    final = target_dir / file_name
    os.replace(tmp, final)
    remove_other_files(data_dir, spec.id, keep=file_name)
    return file_name, sha256_file(final), final.stat().st_size


def remove_other_files(data_dir: Path, model_id: int, keep: str | None) -> None:
    for p in models_dir(data_dir).glob(f"{model_id}.*"):
        if p.name != keep:
            p.unlink(missing_ok=True)


def apply_seed(
    db: Database, data_dir: Path, spec: SeedSpec, base_dir: Path | None = None
) -> dict[str, Any]:
    """Apply ``spec`` to the store; raises ``ValueError`` on a spec that cannot apply.
    Returns a summary: counts, each model's file/checksum/size, the job ids."""
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    for t in spec.tenants:
        db.upsert_tenant(t)
    for u in spec.users:
        db.upsert_user(u.name, u.all_tokens(), u.tenants, u.service)
    models: list[dict[str, Any]] = []
    for m in spec.models:
        for g in m.grants or []:
            if not db.user_exists(g):
                raise ValueError(f"model {m.id}: grant to unknown user {g!r}")
        if m.archive is not None or m.directory is not None:
            file_name, checksum, size = store_model_file(data_dir, m, base_dir)
        else:
            remove_other_files(data_dir, m.id, keep=None)
            file_name, checksum, size = None, None, None
        if m.checksum is not None:
            checksum = m.checksum
        db.upsert_model(
            id=m.id,
            name=m.name,
            tenant=m.tenant,
            version=m.version,
            checksum=checksum,
            size=size,
            file_name=file_name,
            grants=m.grants,
            file_url=m.file_url,
        )
        models.append(
            {
                "id": m.id,
                "file_name": file_name,
                "file_url": m.file_url,
                "checksum": checksum,
                "size": size,
            }
        )
    jobs = [db.insert_job(j.record(), upsert=True)["id"] for j in spec.jobs]
    return {
        "tenants": len(spec.tenants),
        "users": len(spec.users),
        "models": models,
        "jobs": jobs,
    }
