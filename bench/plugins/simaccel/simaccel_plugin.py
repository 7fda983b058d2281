"""A simulated accelerator behind the SDK's serve API, for the benchmarks.

The "device" is one per replica: an ``asyncio.Lock`` held for ``BASE_S + PER_ITEM_S *
items`` per call, at most ``MAX_BATCH`` items per call (a larger batch from Ray is run
as several calls, in order). A model load sleeps ``LOAD_S`` after the runtime has
downloaded and extracted the archive. Its ceiling is ``MAX_BATCH / (BASE_S + PER_ITEM_S
* MAX_BATCH)`` items/s per replica (32 / 0.114 s = 281 with the defaults).

The replica counts device calls, items and busy time, and its models at every load and
release: *loaded* copies (an evicted copy stays loaded while a request still uses it)
and *resident* = loaded + loading, so the bench can check a residency bound exactly
rather than by sampling; ``model_stats`` returns it all.

Settings (environment of the replica, passed on by ``deploy()``):
``SYNAPSE_TEST_SIMACCEL_LOAD_S`` (0.2), ``_BASE_S`` (0.05), ``_PER_ITEM_S`` (0.002),
``_MAX_BATCH`` (32); ``SYNAPSE_TEST_SIMACCEL_EVENTS_DIR``: each replica appends its load,
release and (every second at most) device figures to ``replica-<pid>.jsonl`` there, so
the bench sees every replica (a handle call reaches whichever replica Ray picks).
"""

# Like the example plugins: no ``from __future__ import annotations`` (FastAPI reads the
# endpoint's annotations at runtime).
import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

import serve_runtime.deployment as runtime_deployment
from serve_runtime.backend_client import ModelAccessError
from serve_runtime.deployment import BaseServeDeployment, BatchItem

# This module travels by value (deploy() registers it with cloudpickle): a global it
# names is pickled with it, and the runtime's ContextVar cannot be. Reach the runtime's
# private helpers through their module, which pickles by reference.

app = FastAPI(title="simulated accelerator")

MAX_EVENTS = 20_000


def _setting(name: str, default: float) -> float:
    raw = os.environ.get(f"SYNAPSE_TEST_SIMACCEL_{name}")
    return float(raw) if raw not in (None, "") else default


class SimModel:
    def __init__(self, info: dict[str, Any]) -> None:
        self.model_id = info.get("id")
        self.tenant = info.get("tenant")

    def release(self) -> None:
        return None


class SimAccelDeployment(BaseServeDeployment):
    """``POST /`` with any JSON object; answers after a (simulated) device call."""

    app = app

    def __init__(self, backend_url: str) -> None:
        super().__init__(backend_url)
        self.load_s = _setting("LOAD_S", 0.2)
        self.base_s = _setting("BASE_S", 0.05)
        self.per_item_s = _setting("PER_ITEM_S", 0.002)
        self.max_batch = int(_setting("MAX_BATCH", 32))
        self._device = asyncio.Lock()
        self._accel: dict[str, Any] = {
            "calls": 0,
            "items": 0,
            "busy_s": 0.0,
            "batch_sizes": {},
            "first_call_at": None,
            "last_call_at": None,
        }
        self._max = {"resident": 0, "loaded": 0}
        self._events: list[dict[str, Any]] = []
        events_dir = os.environ.get("SYNAPSE_TEST_SIMACCEL_EVENTS_DIR")
        self._log = Path(events_dir) / f"replica-{os.getpid()}.jsonl" if events_dir else None
        self._flushed_at = 0.0

    # -- residency, counted by the replica itself at every load and release

    def _counts(self, extra_loaded: int = 0) -> dict[str, int]:
        loaded = len(self._store.resident) + extra_loaded
        loading = self._store.loading_now - extra_loaded
        return {"loaded": loaded, "resident": loaded + max(0, loading)}

    def _write(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            with self._log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _note(self, event: str, model: Any, counts: dict[str, int]) -> None:
        for k in self._max:
            self._max[k] = max(self._max[k], counts[k])
        record = {
            "t": time.time(),
            "event": event,
            "model": model,
            **counts,
            "loads": self._store.stats.loads,
            "releases": self._store.stats.releases,
        }
        if len(self._events) < MAX_EVENTS:
            self._events.append(record)
        self._write(record)

    async def _get_model(self, model_info: dict[str, Any]) -> SimModel:
        # Called inside the store's load task: this load counts as loading until the
        # store files it as loaded, right after this returns.
        self._note("load_start", model_info.get("id"), self._counts())
        await asyncio.sleep(self.load_s)
        self._note("load_end", model_info.get("id"), self._counts(extra_loaded=1))
        return SimModel(model_info)

    async def _release_model(self, model: Any, model_info: dict[str, Any]) -> None:
        # The store has already dropped the entry: the counts are what stays.
        self._note("release", model_info.get("id"), self._counts())
        await super()._release_model(model, model_info)

    # -- the endpoint and the device

    @app.post("/")
    async def infer(self, body: dict[str, Any]) -> Any:
        return await self.predict(body)

    async def infer_batch(self, requests: list[BatchItem]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(requests), self.max_batch):
            chunk = requests[start : start + self.max_batch]
            async with self._device:
                t0 = time.perf_counter()
                await asyncio.sleep(self.base_s + self.per_item_s * len(chunk))
                busy = time.perf_counter() - t0
            a = self._accel
            a["calls"] += 1
            a["items"] += len(chunk)
            a["busy_s"] += busy
            a["batch_sizes"][len(chunk)] = a["batch_sizes"].get(len(chunk), 0) + 1
            now = time.time()
            a["first_call_at"] = a["first_call_at"] or now - busy
            a["last_call_at"] = now
            out.extend({"model": r.model.model_id, "batch": len(chunk)} for r in chunk)
        if self._log is not None and time.monotonic() - self._flushed_at > 1.0:
            self._flushed_at = time.monotonic()
            self._write({"t": time.time(), "event": "accel", "accel": self._accel_view()})
        return out

    def _accel_view(self) -> dict[str, Any]:
        accel = dict(self._accel)
        accel["batch_sizes"] = {str(k): v for k, v in sorted(accel["batch_sizes"].items())}
        return accel

    async def model_stats(self) -> dict[str, Any]:
        stats = await super().model_stats()
        stats.update(
            {
                "accel": self._accel_view(),
                **{f"{k}_now": v for k, v in self._counts().items()},
                **{f"{k}_max": v for k, v in self._max.items()},
                "events": list(self._events),
                "settings": {
                    "load_s": self.load_s,
                    "base_s": self.base_s,
                    "per_item_s": self.per_item_s,
                    "max_batch": self.max_batch,
                    "max_models_per_replica": self.max_models_per_replica,
                    "batch_options": self.batch_options,
                },
            }
        )
        return stats


class SdkLikeSimAccelDeployment(SimAccelDeployment):
    """The SDK's cache, emulated: keyed by the caller's token, one copy per token.

    The SDK keys its multiplexed cache by the ``serve_multiplexed_model_id`` header,
    which in its protocol is the caller's JWT (model + user token): every (user, model)
    pair loads its own copy. Here the LRU key is that header and the shared store is
    given a per-token identity (the token's hash appended to the model version), so
    users never share a copy; deploy it with a huge ``max_models_per_replica`` for
    "no eviction". Authorization is the runtime's, unchanged.
    """

    async def _checkout(self) -> Any:
        _, claims = self._claims()
        try:
            info = await self._store.authorize(claims.model, claims.token, claims.tenant)
            mux_id = serve.get_multiplexed_model_id()
            per_token = hashlib.sha256(mux_id.encode()).hexdigest()[:12]
            info = {**info, "version": f"{info.get('version')}+{per_token}"}
            return await self._store.checkout(mux_id, info, claims.token, claims.tenant)
        except ModelAccessError as e:
            raise runtime_deployment._http_error(e.status, e.code, str(e), e.transient) from None
