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
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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


def identity_key(ident: tuple[str, str, str, str]) -> str:
    """``tenant:model:version:checksum``: a model's name as a slot key (no secret in it)."""
    return ":".join(ident)


Ident = tuple[str, str, str, str]


@dataclass(eq=False)
class LoadedModel:
    ident: Ident
    model: Any
    info: dict[str, Any]
    path: Path  # the extracted archive, given to the loader
    workdir: Path  # what is deleted when the copy goes
    key: str = ""  # the slot it fills
    leases: int = 0  # requests using it right now
    slotted: bool = True  # False once evicted or replaced: it goes when its leases end


@dataclass
class StoreStats:
    """What the store has done; a subclass may also export each event
    (``serve_runtime.replica_metrics``)."""

    loads: int = 0
    releases: int = 0
    load_failures: int = 0

    def count(self, event: str) -> None:
        """One more ``event``: a field's name."""
        setattr(self, event, getattr(self, event) + 1)


class ModelStore:
    """The loaded models of one replica: a bounded LRU of slots, each holding one copy.

    A slot is keyed by what the router routes on (the model key of a model-affine call,
    else the model's identity). Bringing a model in runs as its own task, in order:
    fetch (download, verify, extract: nothing is evicted yet, and a failure is
    remembered for ``failure_backoff_s``), make room (evict the least recently used
    idle slot; a copy still in use is only unslotted and goes when its last request
    ends, so no file is ever deleted under a request), then the loader. Copies in
    memory, draining ones and loads in progress included, never exceed ``max_models``.
    A load whose callers all went away still lands in a slot, so it counts and is
    evicted like any other. Waiting for room blocks only the load that needs it.
    """

    def __init__(
        self,
        backend: BackendClient,
        root: Path,
        *,
        loader: Loader,
        releaser: Releaser,
        max_models: int,
        max_download_bytes: int,
        max_unpacked_bytes: int,
        auth_ttl_s: float = 30.0,
        failure_backoff_s: float = 10.0,
        on_change: Callable[[list[str]], None] | None = None,
        stats: StoreStats | None = None,
    ):
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.backend = backend
        self.root = Path(root)
        self.loader = loader
        self.releaser = releaser
        self.max_models = max_models
        self.max_download_bytes = max_download_bytes
        self.max_unpacked_bytes = max_unpacked_bytes
        self.auth_ttl_s = auth_ttl_s
        self.failure_backoff_s = failure_backoff_s
        self.on_change = on_change
        self.stats = stats if stats is not None else StoreStats()
        self._slots: OrderedDict[str, LoadedModel] = OrderedDict()  # LRU order
        self._copies: dict[Ident, LoadedModel] = {}  # in memory: slotted and draining
        self._loading: dict[Ident, asyncio.Task[LoadedModel]] = {}
        self._loading_keys: dict[Ident, str] = {}
        self._failed: dict[Ident, tuple[float, ModelAccessError]] = {}
        self._auth: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}
        self._room = asyncio.Condition()
        self._loaders = 0  # loader calls in progress: each holds a unit of room
        self._freeing = 0  # copies whose release hook has not finished: still in memory
        self._frees: set[asyncio.Task[None]] = set()

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

    # -- what is loaded

    @property
    def resident(self) -> list[LoadedModel]:
        """Every copy in memory: those in a slot and those draining."""
        return list(self._copies.values())

    @property
    def loading_now(self) -> int:
        """Loader calls in progress (each already holds its room)."""
        return self._loaders

    @property
    def slot_keys(self) -> list[str]:
        return list(self._slots)

    # -- using a model

    async def checkout(
        self, key: str, info: dict[str, Any], token: str, tenant: str | None
    ) -> LoadedModel:
        """The copy of this model for slot ``key``, leased: give it back with ``checkin``.

        A slot holding another version of the model gets the new one; the old copy
        goes once its requests end.
        """
        ident = identity(info)
        while True:
            entry = self._slots.get(key)
            if entry is None or entry.ident != ident:
                entry = self._copies.get(ident)  # in another slot, or draining
                if entry is not None and not entry.slotted:
                    self._slot(key, entry)  # wanted again before it went: keep it
            if entry is not None:
                self._slots.move_to_end(entry.key)
                entry.leases += 1
                return entry
            self._raise_if_failed(ident)
            task = self._loading.get(ident)
            if task is None:
                task = asyncio.create_task(self._bring_in(key, ident, info, token, tenant))
                self._loading[ident] = task
                self._loading_keys[ident] = key
                task.add_done_callback(lambda _t, i=ident: self._loaded(i))
                self._changed()  # routed here from now: the copy is on its way
            await asyncio.shield(task)  # a caller going away does not cancel the load

    def checkin(self, entry: LoadedModel) -> None:
        """One request is done with ``entry``; an evicted copy goes with its last one."""
        entry.leases -= 1
        if entry.leases == 0 and not entry.slotted:
            self._free_later(entry)

    @contextlib.asynccontextmanager
    async def use(
        self, key: str, info: dict[str, Any], token: str, tenant: str | None
    ) -> AsyncIterator[LoadedModel]:
        entry = await self.checkout(key, info, token, tenant)
        try:
            yield entry
        finally:
            self.checkin(entry)

    def lease_until_done(self, entry: LoadedModel, task: asyncio.Task[Any]) -> None:
        """Keep ``entry`` (already leased) until ``task`` ends: the SDK's ``get_model()``."""
        task.add_done_callback(lambda _t: self.checkin(entry))

    # -- bringing a model in

    def _loaded(self, ident: Ident) -> None:
        self._loading.pop(ident, None)
        if self._loading_keys.pop(ident, None) not in self._slots:
            self._changed()  # it failed: no longer on its way

    def _raise_if_failed(self, ident: Ident) -> None:
        failed = self._failed.get(ident)
        if failed is None:
            return
        until, error = failed
        if time.monotonic() < until:
            raise error
        del self._failed[ident]

    async def _bring_in(
        self, key: str, ident: Ident, info: dict[str, Any], token: str, tenant: str | None
    ) -> LoadedModel:
        started = time.perf_counter()
        try:
            workdir, model_dir = await self._fetch(ident, info, token, tenant)
            try:
                model = await self._load(key, model_dir, info)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, workdir, True)
                raise
        except ModelAccessError as e:
            self._remember(ident, e)
            raise
        except Exception as e:
            error = ModelAccessError(
                f"model {ident[1]} failed to load ({type(e).__name__})",
                status=500,
                code="model_load_failed",
            )
            log.warning("model load failed", model=ident[1], error=type(e).__name__, exc_info=e)
            self._remember(ident, error)
            raise error from None
        entry = LoadedModel(ident=ident, model=model, info=info, path=model_dir, workdir=workdir)
        self._copies[ident] = entry
        self._slot(key, entry)
        elapsed = time.perf_counter() - started
        self.stats.count("loads")
        log.info(
            "model loaded",
            tenant=ident[0],
            model=ident[1],
            version=ident[2],
            seconds=round(elapsed, 3),
        )
        return entry

    def _remember(self, ident: Ident, error: ModelAccessError) -> None:
        self.stats.count("load_failures")
        self._failed[ident] = (time.monotonic() + self.failure_backoff_s, error)
        if len(self._failed) > 1000:
            now = time.monotonic()
            self._failed = {k: v for k, v in self._failed.items() if v[0] > now}

    async def _fetch(
        self, ident: Ident, info: dict[str, Any], token: str, tenant: str | None
    ) -> tuple[Path, Path]:
        """Download, verify and extract into a fresh work directory; evicts nothing."""
        tenant_code, model_id, version, _ = ident
        file_url = info.get("file")
        if not file_url:
            raise ModelAccessError(
                f"model {model_id} has no file to load", status=422, code="model_has_no_file"
            )
        name = f"{tenant_code}-{model_id}-v{version or 0}-{uuid.uuid4().hex[:8]}"
        workdir = self.root / name
        archive = workdir / "archive.download"
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
        except BaseException as e:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            if isinstance(e, ModelFetchError):
                raise _fetch_error(model_id, e) from None
            raise
        return workdir, model_dir

    async def _load(self, key: str, model_dir: Path, info: dict[str, Any]) -> Any:
        """Run the loader once there is room for one more copy."""
        async with self._room:
            while len(self._copies) + self._freeing + self._loaders >= self.max_models:
                if not self._freeing:  # nothing on its way out yet: send one
                    idle = self._idle_victim(key)
                    if idle is not None:
                        self._unslot(idle)  # room once its release hook has run
                    elif self._slots and all(e.slotted for e in self._copies.values()):
                        self._unslot(next(iter(self._slots.values())))  # room when idle
                await self._room.wait()
            self._loaders += 1
        try:
            return await self.loader({**info, "path": model_dir})
        finally:
            self._loaders -= 1
            await self._notify_room()

    # -- slots and freeing

    def _idle_victim(self, key: str) -> LoadedModel | None:
        """What to evict for a load into ``key``: its older version, else the LRU idle copy."""
        candidates = [self._slots[key]] if key in self._slots else []
        candidates.extend(self._slots.values())
        return next((e for e in candidates if e.leases == 0), None)

    def _slot(self, key: str, entry: LoadedModel) -> None:
        entry.key = key
        entry.slotted = True
        old = self._slots.get(key)
        self._slots[key] = entry
        self._slots.move_to_end(key)
        if old is not None and old is not entry:
            old.slotted = False  # a newer version took its slot
            if old.leases == 0:
                self._free_later(old)
        self._changed()

    def _unslot(self, entry: LoadedModel) -> None:
        if self._slots.get(entry.key) is entry:
            del self._slots[entry.key]
            self._changed()
        entry.slotted = False
        if entry.leases == 0:
            self._free_later(entry)

    def _changed(self) -> None:
        """Tell the router what this replica holds or is loading (Ray's wrapper does too)."""
        if self.on_change is not None:
            keys = list(dict.fromkeys([*self._slots, *self._loading_keys.values()]))
            try:
                self.on_change(keys)
            except Exception:
                log.exception("publishing the replica's models failed")

    def _free_later(self, entry: LoadedModel) -> None:
        """Take ``entry`` out of memory now; its release hook and files follow."""
        if self._copies.get(entry.ident) is not entry:
            return  # already freed
        del self._copies[entry.ident]
        self._freeing += 1
        task = asyncio.get_running_loop().create_task(self._free(entry))
        self._frees.add(task)
        task.add_done_callback(self._frees.discard)

    async def _free(self, entry: LoadedModel) -> None:
        self.stats.count("releases")
        try:
            await self.releaser(entry.model, entry.info)
        except Exception:
            log.exception("model release hook failed", model=entry.ident[1])
        finally:
            self._freeing -= 1
            await self._notify_room()
            await asyncio.to_thread(shutil.rmtree, entry.workdir, True)
        log.info("model released", tenant=entry.ident[0], model=entry.ident[1])

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def close(self) -> None:
        """Release every copy (replica shutdown); in-flight loads are cancelled."""
        for task in list(self._loading.values()):
            task.cancel()
        for entry in list(self._copies.values()):
            entry.slotted = False
            self._free_later(entry)
        self._slots.clear()
        if self._frees:
            await asyncio.gather(*self._frees, return_exceptions=True)


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
