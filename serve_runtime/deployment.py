"""``BaseServeDeployment``: the SDK's serve action, with a shared, bounded model cache.

Subclasses keep the SDK's surface: ``app = FastAPI()`` as a class attribute, an
``infer`` endpoint decorated with ``@app.post('/')``, ``_get_model(model_info)``.
What changes underneath:

* The ``ModelStore`` bounds the models per replica (``max_models_per_replica``) with
  its own LRU, keyed by what a model is, so two users of one model share one loaded
  copy; it fetches and verifies before it evicts, remembers failing models briefly,
  and frees a copy (release hook, then its files) only when no request uses it. It
  reports its models to Serve's router, as ``serve.multiplexed`` does, so requests
  follow their model.
* Every request is authorized for its model against the backend with the caller's
  own token (cached briefly), before any shared copy serves it.
* A coalesced call (``serve_runtime.coalesced``: many jobs' items in one request)
  runs each item through the plugin's endpoint, and its items as one device batch.
* Two routing modes: compatible (the header is the SDK's JWT) and model-affine (the
  header is ``tenant:model[:version]`` and the JWT rides in ``synapse-model-token``).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from fastapi import FastAPI, HTTPException
from ray import serve

from config import configure_logging, get_settings
from serve_runtime.action import BaseAction
from serve_runtime.asgi_call import Headers, call_asgi
from serve_runtime.backend_client import BackendClient, ModelAccessError
from serve_runtime.batcher import DeviceBatcher
from serve_runtime.coalesced import CoalescedCalls, arrivals_for_batcher
from serve_runtime.deferred import DeferredResults
from serve_runtime.model_dirs import ReplicaDir
from serve_runtime.model_routing import ModelRouting
from serve_runtime.model_store import LoadedModel, ModelStore, identity, identity_key
from serve_runtime.remote import infer_remote as remote_call
from serve_runtime.replica_metrics import ExportedStats
from serve_runtime.tickets import Caller
from serve_runtime.tokens import (
    AFFINE_TOKEN_HEADER,
    MODEL_TOKEN_HEADER,
    InvalidClaimId,
    ModelClaims,
    ModelKey,
    TokenError,
    decode_model_token,
    looks_like_jwt,
)

log = structlog.get_logger("serve_runtime.deployment")

_HEADERS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "synapse_request_headers", default=None
)


class _CaptureHeaders:
    """Pure ASGI middleware: makes the request headers visible to ``get_model``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        reset = _HEADERS.set(headers)
        try:
            await self.app(scope, receive, send)
        finally:
            _HEADERS.reset(reset)


def _http_error(status: int, code: str, message: str, transient: bool = False) -> HTTPException:
    return HTTPException(
        status_code=status, detail={"message": message, "code": code, "transient": transient}
    )


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch; every item of one ``infer_batch`` call shares ``model``."""

    model: Any
    body: Any
    model_info: dict[str, Any]


class BaseServeDeployment(BaseAction):
    """Base class for Ray Serve inference deployments (the SDK's API)."""

    action_name: ClassVar[str] = "inference"
    # The SDK's class attribute. A plugin defines its own (``app = FastAPI()``) and
    # decorates ``infer`` on it; deploy() refuses a plugin that would serve this one.
    app: ClassVar[FastAPI] = FastAPI()

    # Set by deploy() from config.yaml; defaults suit a direct serve.run too.
    max_models_per_replica: ClassVar[int] = 3
    batch_options: ClassVar[dict[str, Any] | None] = None
    deferred_deadline_s: ClassVar[float | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        app = cls.__dict__.get("app")
        if isinstance(app, FastAPI) and not getattr(app.state, "synapse_headers", False):
            app.add_middleware(_CaptureHeaders)
            app.add_middleware(CoalescedCalls)  # outermost: each item is a request of its own
            app.state.synapse_headers = True

    # The application's TicketStore handle, set by deploy() before ``__init__`` runs (so
    # a plugin's own ``__init__(self, backend_url)`` keeps the SDK's signature); None
    # keeps deferred tickets in this replica only.
    _ticket_store: Any = None

    def __init__(self, backend_url: str) -> None:
        settings = get_settings()
        configure_logging(settings.log_format, settings.log_level)  # redaction in replicas too
        self.backend_url = backend_url
        self._signing_key = (
            settings.signing_key.get_secret_value() if settings.signing_key else backend_url
        )
        self._dir = ReplicaDir(settings.model_dir)  # sweeps dead replicas' files too
        self._store = ModelStore(
            BackendClient(backend_url, settings.backend_timeout_s),
            self._dir.path,
            loader=self._get_model,
            releaser=self._release_model,
            max_models=self.max_models_per_replica,
            max_download_bytes=settings.max_download_bytes,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            auth_ttl_s=settings.auth_cache_ttl_s,
            failure_backoff_s=settings.model_failure_backoff_s,
            on_change=ModelRouting().publish,
            stats=ExportedStats(),
        )
        self._deferred = DeferredResults(
            self.deferred_deadline_s, keep_s=settings.deferred_keep_s, shared=self._ticket_store
        )
        # Serve awaits ``__del__`` at a replica's graceful shutdown. An instance attribute,
        # so that garbage collection never meets a coroutine finaliser.
        self.__del__ = self._shutdown
        self._batcher: DeviceBatcher[BatchItem] | None = (
            DeviceBatcher(self._checked_batch, **self.batch_options) if self.batch_options else None
        )

    # -- the SDK's surface

    def execute(self) -> None:
        """No-op: serve deployments handle inference via ``infer()``."""
        return None

    @classmethod
    def infer_remote(cls, params: dict[str, Any], ctx: Any) -> Any:
        """Call the deployed endpoint (route prefix, model token, request), as the SDK does."""
        return remote_call(params, ctx)

    async def get_model(self) -> Any:
        """The model for this request's multiplexing header, authorized for its caller.

        The copy is leased until the calling task ends (the request, or its deferred
        work): it is never released or deleted while the caller may still use it.
        """
        entry = await self._checkout()
        task = asyncio.current_task()
        if task is None:  # not reachable from an endpoint; never lease forever
            self._store.checkin(entry)
        else:
            self._store.lease_until_done(entry, task)
        return entry.model

    @abstractmethod
    async def _get_model(self, model_info: dict[str, Any]) -> Any:
        """Load the model from ``model_info['path']`` (the extracted archive)."""

    @abstractmethod
    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        """The endpoint; decorate with ``@app.post('/')``."""

    async def infer_batch(self, requests: list[BatchItem]) -> list[Any]:
        """Run a batch for one model; override to use ``predict``/batching."""
        raise NotImplementedError(f"{type(self).__name__} does not implement infer_batch")

    async def _release_model(self, model: Any, model_info: dict[str, Any]) -> None:
        """Release hook, called when a model leaves the replica; calls ``release()``/``close()``."""
        for name in ("release", "close"):
            hook = getattr(model, name, None)
            if callable(hook):
                result = hook()
                if inspect.isawaitable(result):
                    await result
                return

    async def asgi_request(
        self, method: str, path: str, root_path: str, headers: Headers, body: bytes
    ) -> tuple[int, Headers, bytes]:
        """One HTTP request through this replica's own app, in process: the entry of
        calls through a ``DeploymentHandle`` (``serve_runtime.handle_transport``)."""
        app = self._asgi_app  # type: ignore[attr-defined]  # set by serve.ingress
        return await call_asgi(app, method, path, root_path, headers, body)

    # -- running a request through infer_batch (batched when configured)

    async def predict(self, body: Any) -> Any:
        """Run ``body`` on this request's model through ``infer_batch``; batched by model."""
        entry = await self._checkout()
        try:  # the copy stays while this request uses it, evicted or not
            item = BatchItem(model=entry.model, body=body, model_info=entry.info)
            if self._batcher is None:
                return (await self._checked_batch([item]))[0]
            # One batch, one copy; a coalesced call's items run as one batch.
            return await self._batcher.submit(id(entry), item, arrivals_for_batcher())
        finally:
            self._store.checkin(entry)

    async def _checked_batch(self, items: list[BatchItem]) -> list[Any]:
        out = await self.infer_batch(items)
        if len(out) != len(items):
            raise RuntimeError(f"infer_batch returned {len(out)} results for {len(items)} requests")
        return out

    # -- internals

    def _claims(self) -> tuple[str | None, ModelClaims]:
        """The caller's verified claims, and the model key of a model-affine call."""
        headers = _HEADERS.get() or {}
        mux_id = headers.get(MODEL_TOKEN_HEADER)
        if not mux_id:
            try:
                mux_id = serve.get_multiplexed_model_id()
            except Exception:
                mux_id = ""
        if not mux_id:
            raise _http_error(400, "missing_model_header", f"missing {MODEL_TOKEN_HEADER} header")
        try:
            if looks_like_jwt(mux_id):  # compatible mode: the header is the SDK's JWT
                return None, decode_model_token(mux_id, self._signing_key)
            key = ModelKey.parse(mux_id)
            token = headers.get(AFFINE_TOKEN_HEADER)
            if not token:
                raise _http_error(
                    401, "missing_model_token", f"model-affine call without {AFFINE_TOKEN_HEADER}"
                )
            claims = decode_model_token(token, self._signing_key)
        except InvalidClaimId as e:  # an id that could change the backend URL: never sent
            raise _http_error(400, e.code, str(e)) from None
        except TokenError as e:
            raise _http_error(401, "invalid_model_token", str(e)) from None
        if claims.model != key.model or (claims.tenant or None) != key.tenant:
            raise _http_error(
                403, "token_model_mismatch", f"the model token is not for model key {key}"
            )
        return mux_id, claims

    async def _ticket_caller(self) -> Caller:
        """Whom a deferred ticket answers; authorized for the model as inference is."""
        _, claims = self._claims()
        try:
            await self._store.authorize(claims.model, claims.token, claims.tenant)
        except ModelAccessError as e:
            raise _http_error(e.status, e.code, str(e), e.transient) from None
        return Caller.of(claims.tenant, claims.model, claims.token)

    async def _checkout(self) -> LoadedModel:
        """Authorize the caller, then lease the model's copy from the store.

        The store's slots are keyed by the model, never by the caller: in model-affine
        mode by the header's key (what Serve routes on; a newer version replaces the
        slot's copy), in compatible mode by the model's identity (version and checksum
        included), so users of one model share one copy and the bound counts models.
        """
        affine_key, claims = self._claims()
        try:
            info = await self._store.authorize(claims.model, claims.token, claims.tenant)
            key = affine_key or identity_key(identity(info))
            return await self._store.checkout(key, info, claims.token, claims.tenant)
        except ModelAccessError as e:
            raise _http_error(e.status, e.code, str(e), e.transient) from None

    async def _shutdown(self) -> None:
        """Release every model and delete this replica's files (graceful shutdown)."""
        await self._deferred.close()
        await self._store.close()
        await self._store.backend.aclose()
        await asyncio.to_thread(self._dir.close)

    # -- introspection for tests, the CLI and metrics

    async def model_stats(self) -> dict[str, Any]:
        s = self._store.stats
        return {
            "pid": os.getpid(),
            "loads": s.loads,
            "releases": s.releases,
            "load_failures": s.load_failures,
            "slots": self._store.slot_keys,
            "batch_sizes": dict(self._batcher.batch_sizes) if self._batcher else {},
            "dir": str(self._dir.path),
            "resident": [
                {
                    "ident": list(e.ident),
                    "key": e.key,
                    "slotted": e.slotted,
                    "leases": e.leases,
                    "path": str(e.path),
                }
                for e in self._store.resident
            ],
        }


__all__ = ["BaseServeDeployment", "BatchItem", "get_settings"]
