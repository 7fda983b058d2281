"""``BaseServeDeployment``: the SDK's serve action, with a shared, bounded model cache.

Subclasses keep the SDK's surface: ``app = FastAPI()`` as a class attribute, an
``infer`` endpoint decorated with ``@app.post('/')``, ``_get_model(model_info)``.
What changes underneath:

* Ray Serve's ``serve.multiplexed`` bounds the models per replica and routes by the
  multiplexing header. Its entries are cheap handles onto a ``ModelStore`` keyed by
  what a model is, so two users of one model share one loaded copy, and an evicted
  handle releases the copy (release hook, then its directory) when the last goes.
* Every request is authorized for its model against the backend with the caller's
  own token (cached briefly), before any shared copy serves it.
* Two routing modes: compatible (the header is the SDK's JWT) and model-affine (the
  header is ``tenant:model[:version]`` and the JWT rides in ``synapse-model-token``).
"""

from __future__ import annotations

import contextvars
import inspect
import os
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import structlog
from fastapi import FastAPI, HTTPException

from config import configure_logging, get_settings
from serve_runtime.action import BaseAction
from serve_runtime.backend_client import BackendClient, ModelAccessError
from serve_runtime.batcher import DeviceBatcher
from serve_runtime.deferred import DeferredResults
from serve_runtime.model_store import LoadedModel, ModelStore, identity
from serve_runtime.remote import infer_remote as remote_call
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
_LOAD_FOR: contextvars.ContextVar[tuple[dict[str, Any], ModelClaims] | None] = (
    contextvars.ContextVar("synapse_load_for", default=None)
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


class _Handle:
    """What Ray's multiplexed LRU holds: a reference to a shared loaded model.

    Ray awaits ``__del__`` on eviction; it is an instance attribute so that garbage
    collection never sees a coroutine finaliser.
    """

    def __init__(self, store: ModelStore, entry: LoadedModel) -> None:
        self.entry = entry
        self._store = store
        self.__del__ = self._evict

    async def _evict(self) -> None:
        await self._store.evict(self.entry)


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
            app.state.synapse_headers = True

    def __init__(self, backend_url: str) -> None:
        settings = get_settings()
        configure_logging(settings.log_format, settings.log_level)  # redaction in replicas too
        self.backend_url = backend_url
        self._signing_key = (
            settings.signing_key.get_secret_value() if settings.signing_key else backend_url
        )
        self._store = ModelStore(
            BackendClient(backend_url, settings.backend_timeout_s),
            Path(settings.model_dir) / f"replica-{os.getpid()}",
            loader=self._get_model,
            releaser=self._release_model,
            max_download_bytes=settings.max_download_bytes,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            auth_ttl_s=settings.auth_cache_ttl_s,
        )
        self._deferred = DeferredResults(self.deferred_deadline_s)
        self._load_handle_bounded = self._wrap_multiplexed(self._load_handle)
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
        """The model for this request's multiplexing header, authorized for its caller."""
        return (await self._resolve()).model

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

    # -- running a request through infer_batch (batched when configured)

    async def predict(self, body: Any) -> Any:
        """Run ``body`` on this request's model through ``infer_batch``; batched by model."""
        entry = await self._resolve()
        async with self._store.lease(entry):  # an eviction waits for this request
            item = BatchItem(model=entry.model, body=body, model_info=entry.info)
            if self._batcher is None:
                return (await self._checked_batch([item]))[0]
            return await self._batcher.submit(id(entry), item)  # one batch, one copy

    async def _checked_batch(self, items: list[BatchItem]) -> list[Any]:
        out = await self.infer_batch(items)
        if len(out) != len(items):
            raise RuntimeError(f"infer_batch returned {len(out)} results for {len(items)} requests")
        return out

    # -- internals

    def _wrap_multiplexed(self, fn: Callable[[str], Any]) -> Callable[[str], Any]:
        from ray import serve
        from ray.serve.context import _get_internal_replica_context

        if _get_internal_replica_context() is None:  # outside Serve: an unbounded dict
            cache: dict[str, Any] = {}

            async def plain(model_id: str) -> Any:
                if model_id not in cache:
                    cache[model_id] = await fn(model_id)
                return cache[model_id]

            return plain

        async def load(model_id: str) -> Any:  # a plain function: Ray sets attributes on it
            return await fn(model_id)

        return serve.multiplexed(max_num_models_per_replica=self.max_models_per_replica)(load)

    async def _load_handle(self, mux_id: str) -> _Handle:
        pending = _LOAD_FOR.get()
        if pending is None:
            raise RuntimeError("model handles are loaded only through get_model()")
        info, claims = pending
        entry = await self._store.acquire(info, claims.token, claims.tenant)
        return _Handle(self._store, entry)

    def _claims(self) -> tuple[str | None, ModelClaims]:
        """The caller's verified claims, and the model key of a model-affine call."""
        headers = _HEADERS.get() or {}
        mux_id = headers.get(MODEL_TOKEN_HEADER)
        if not mux_id:
            try:
                from ray import serve

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

    async def _resolve(self) -> LoadedModel:
        """Authorize the caller, then get the model through Ray's bounded multiplexed LRU.

        The LRU is keyed by the model, never by the caller: in model-affine mode by the
        header's key (what Ray routes on), in compatible mode by the model's identity,
        so users of one model share one entry and the bound counts models.
        """
        affine_key, claims = self._claims()
        try:
            info = await self._store.authorize(claims.model, claims.token, claims.tenant)
        except ModelAccessError as e:
            raise _http_error(e.status, e.code, str(e), e.transient) from None
        tenant, model_id, version, _ = identity(info)
        lru_key = affine_key or str(ModelKey(tenant=tenant, model=model_id, version=version))
        reset = _LOAD_FOR.set((info, claims))
        try:
            handle: _Handle = await self._load_handle_bounded(lru_key)
        except ModelAccessError as e:
            raise _http_error(e.status, e.code, str(e), e.transient) from None
        finally:
            _LOAD_FOR.reset(reset)
        return handle.entry

    # -- introspection for tests, the CLI and metrics

    async def model_stats(self) -> dict[str, Any]:
        s = self._store.stats
        return {
            "pid": os.getpid(),
            "loads": s.loads,
            "releases": s.releases,
            "resident": [
                {"ident": list(e.ident), "refs": e.refs, "path": str(e.path)}
                for e in self._store.resident
            ],
        }


__all__ = ["BaseServeDeployment", "BatchItem", "get_settings"]
