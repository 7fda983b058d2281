"""Models on a replica: authorized per caller, loaded once per identity, released on eviction.

A model is keyed by what it is (tenant, id, version, checksum), never by who asked,
so two users of one model share one loaded copy. Every caller is still checked
against the backend (``GET models/{id}/`` with their own token), cached briefly per
token and model. The extracted directory lives while the model is loaded and is
removed when the last reference goes; the deployment's release hook runs first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from serve_runtime.archive import ArchiveError, safe_extract
from serve_runtime.backend_client import BackendClient, ModelAccessError
from serve_runtime.download import (
    ChecksumMismatchError,
    DownloadError,
    DownloadTooLargeError,
    download,
)
from serve_runtime.fetch_errors import ModelFetchError

log = structlog.get_logger("serve_runtime.model_store")

Loader = Callable[[dict[str, Any]], Awaitable[Any]]
Releaser = Callable[[Any, dict[str, Any]], Awaitable[None]]


def identity(info: dict[str, Any]) -> tuple[str, str, str, str]:
    """What a model is: (tenant, id, version, checksum); the cache key of a loaded copy."""
    return (
        str(info.get("tenant") or "-"),
        str(info.get("id")),
        str(info.get("version") or ""),
        str(info.get("checksum") or ""),
    )


@dataclass(eq=False)
class LoadedModel:
    ident: tuple[str, str, str, str]
    model: Any
    info: dict[str, Any]
    path: Path
    refs: int = 0  # multiplexed handles holding this copy
    leases: int = 0  # requests using it right now
    loaded_at: float = field(default_factory=time.time)
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class StoreStats:
    loads: int = 0
    releases: int = 0
    load_seconds: list[float] = field(default_factory=list)


class ModelStore:
    """Loaded models of one replica, shared by identity and reference counted."""

    def __init__(
        self,
        backend: BackendClient,
        root: Path,
        *,
        loader: Loader,
        releaser: Releaser,
        max_download_bytes: int,
        max_unpacked_bytes: int,
        auth_ttl_s: float = 30.0,
    ):
        self.backend = backend
        self.root = Path(root)
        self.loader = loader
        self.releaser = releaser
        self.max_download_bytes = max_download_bytes
        self.max_unpacked_bytes = max_unpacked_bytes
        self.auth_ttl_s = auth_ttl_s
        self.stats = StoreStats()
        self._loaded: dict[tuple[str, str, str, str], LoadedModel] = {}
        self._loading: dict[tuple[str, str, str, str], asyncio.Task[LoadedModel]] = {}
        self._auth: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    # -- authorization

    async def authorize(self, model_id: str, token: str, tenant: str | None) -> dict[str, Any]:
        """The model's metadata, as this caller may see it; raises ``ModelAccessError``."""
        key = (hashlib.sha256(token.encode()).hexdigest(), tenant or "", str(model_id))
        now = time.monotonic()
        hit = self._auth.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = await self.backend.get_model(str(model_id), token, tenant)
        if tenant and info.get("tenant") not in (None, tenant):
            raise ModelAccessError(
                f"model {model_id} does not belong to tenant {tenant!r}",
                status=403,
                code="forbidden",
            )
        if len(self._auth) > 10_000:
            self._auth = {k: v for k, v in self._auth.items() if v[0] > now}
        self._auth[key] = (now + self.auth_ttl_s, info)
        return info

    # -- loading

    @property
    def resident(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    async def acquire(self, info: dict[str, Any], token: str, tenant: str | None) -> LoadedModel:
        """The loaded copy of this model (loading it once); the caller holds a reference.

        The load runs as its own task, so a caller that goes away does not cancel it
        for the others waiting on it.
        """
        ident = identity(info)
        entry = self._loaded.get(ident)
        if entry is None:
            task = self._loading.get(ident)
            if task is None:
                task = asyncio.ensure_future(self._load(ident, info, token, tenant))
                self._loading[ident] = task
                task.add_done_callback(lambda t, i=ident: self._load_done(i, t))
            entry = await asyncio.shield(task)
        entry.refs += 1
        return entry

    def _load_done(self, ident: tuple[str, str, str, str], task: asyncio.Task[LoadedModel]) -> None:
        self._loading.pop(ident, None)
        if not task.cancelled() and task.exception() is None:
            self._loaded[ident] = task.result()

    @contextlib.asynccontextmanager
    async def lease(self, entry: LoadedModel) -> AsyncIterator[LoadedModel]:
        """Mark ``entry`` in use for the duration of one request."""
        entry.leases += 1
        entry.idle.clear()
        try:
            yield entry
        finally:
            entry.leases -= 1
            if entry.leases == 0:
                entry.idle.set()

    async def evict(self, entry: LoadedModel, wait_s: float = 120.0) -> None:
        """Release a copy Ray's LRU evicted, once no request uses it.

        Ray evicts before it loads the next model (under its lock), so waiting here keeps
        the copies in memory within ``max_models_per_replica``: the new load starts after
        the old copy is gone. A request that outlives ``wait_s`` does not block forever.
        """
        if entry.leases:
            try:
                await asyncio.wait_for(entry.idle.wait(), wait_s)
            except TimeoutError:
                log.warning(
                    "evicting a model still in use", model=entry.ident[1], leases=entry.leases
                )
        await self.release(entry)

    async def release(self, entry: LoadedModel) -> None:
        """Drop one reference; the last one releases the model and deletes its files."""
        entry.refs -= 1
        if entry.refs > 0 or self._loaded.get(entry.ident) is not entry:
            return
        del self._loaded[entry.ident]
        self.stats.releases += 1
        try:
            await self.releaser(entry.model, entry.info)
        except Exception:
            log.exception("model release hook failed", model=entry.ident[1])
        finally:
            await asyncio.to_thread(shutil.rmtree, entry.path, True)
        log.info("model released", tenant=entry.ident[0], model=entry.ident[1])

    async def _load(
        self, ident: tuple[str, str, str, str], info: dict[str, Any], token: str, tenant: str | None
    ) -> LoadedModel:
        tenant_code, model_id, version, _ = ident
        file_url = info.get("file")
        if not file_url:
            raise ModelAccessError(
                f"model {model_id} has no file to load", status=422, code="model_has_no_file"
            )
        started = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{tenant_code}-{model_id}-v{version or 0}-{uuid.uuid4().hex[:8]}"
        workdir = self.root / name
        archive = self.root / f".{name}.download"
        model_dir = workdir / "model"
        try:
            await asyncio.to_thread(model_dir.mkdir, parents=True)
            await download(
                self.backend.http,
                str(file_url),
                archive,
                headers=self.backend.file_headers(str(file_url), token, tenant),
                max_bytes=self.max_download_bytes,
                checksum=info.get("checksum"),
            )
            await asyncio.to_thread(
                safe_extract, archive, model_dir, max_unpacked_bytes=self.max_unpacked_bytes
            )
            await asyncio.to_thread(archive.unlink, True)
            model = await self.loader({**info, "path": model_dir})
        except ModelFetchError as e:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            await asyncio.to_thread(archive.unlink, True)
            raise _fetch_error(model_id, e) from None
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            await asyncio.to_thread(archive.unlink, True)
            raise
        elapsed = time.perf_counter() - started
        self.stats.loads += 1
        self.stats.load_seconds.append(elapsed)
        log.info(
            "model loaded",
            tenant=tenant_code,
            model=model_id,
            version=version,
            seconds=round(elapsed, 3),
        )
        return LoadedModel(ident=ident, model=model, info=info, path=model_dir)


def _fetch_error(model_id: str, e: ModelFetchError) -> ModelAccessError:
    """Map a fetch failure to an answer: network trouble is transient, bad bytes are not."""
    if isinstance(e, ArchiveError):
        return ModelAccessError(f"model {model_id}: {e}", status=422, code="model_archive_refused")
    if isinstance(e, DownloadTooLargeError | ChecksumMismatchError) or not isinstance(
        e, DownloadError
    ):
        return ModelAccessError(f"model {model_id}: {e}", status=422, code="model_fetch_failed")
    status = e.status_code
    if status in (401, 403):
        return ModelAccessError(f"model {model_id}: {e}", status=403, code="forbidden")
    if status is None or status >= 500 or status == 429:
        return ModelAccessError(
            f"model {model_id}: {e}", status=503, code="model_fetch_failed", transient=True
        )
    return ModelAccessError(f"model {model_id}: {e}", status=422, code="model_fetch_failed")
