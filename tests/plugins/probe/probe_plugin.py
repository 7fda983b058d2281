"""Probe plugin for runtime tests: events go to $SYNAPSE_TEST_EVENTS_DIR/events.jsonl."""

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response

from serve_runtime import deferrable
from serve_runtime.deployment import BaseServeDeployment, BatchItem

app = FastAPI()


def record(event: str, **data: Any) -> None:
    events = Path(os.environ["SYNAPSE_TEST_EVENTS_DIR"]) / "events.jsonl"
    with events.open("a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **data}) + "\n")


class ProbeModel:
    def __init__(self, path: Path, model_id: Any) -> None:
        self.path = Path(path)
        self.model_id = model_id

    def meta(self) -> dict[str, Any]:
        # Read lazily, long after _get_model returned.
        return json.loads((self.path / "meta.json").read_text())

    def release(self) -> None:
        record(
            "release",
            model=self.model_id,
            path=str(self.path),
            exists=self.path.exists(),
            pid=os.getpid(),
        )


class ProbeDeployment(BaseServeDeployment):
    app = app

    async def _get_model(self, model_info: dict[str, Any]) -> ProbeModel:
        name = str(model_info.get("name") or "")
        record("load_start", model=model_info["id"], pid=os.getpid())
        if name.startswith("slow-load"):  # a load long enough for its caller to give up
            await asyncio.sleep(3)
        if name.startswith("broken-loader"):
            raise RuntimeError("probe loader refuses this model")
        record("load", model=model_info["id"], path=str(model_info["path"]), pid=os.getpid())
        return ProbeModel(model_info["path"], model_info["id"])

    @app.post("/")
    @deferrable
    async def infer(self, body: dict) -> Any:
        # Misbehaviours on request, for the bad-input corpus.
        if body.get("respond") == "invalid_json":
            return Response(b"{not json", media_type="application/json")
        if body.get("respond") == "bad_envelope":
            return {"__synapse_deferred__": True, "status": "exploded"}
        if body.get("respond") == "http_500":
            raise RuntimeError("probe asked for a bare 500")
        if body.get("sdk"):  # the SDK's way: get_model(), then use it for a while
            model = await self.get_model()
            record("sdk_model", model=model.model_id, pid=os.getpid())
            await asyncio.sleep(float(body.get("sleep_s", 0)))
            return {"model": model.model_id, "meta": model.meta(), "echo": body}
        return await self.predict(body)

    @app.post("/direct")
    async def direct(self, body: dict) -> Any:
        """Not deferrable: a caller that goes away cancels the request (and its load)."""
        return await self.predict(body)

    async def deferred_stats(self) -> dict[str, Any]:
        """This replica's deferred counters (polls answered here or from the store)."""
        return {"pid": os.getpid(), **self._deferred.stats}

    async def infer_batch(self, requests: list[BatchItem]) -> list[Any]:
        out = []
        for r in requests:
            if r.body.get("count"):  # counted: how often this item was computed
                record("infer", count=r.body["count"])
            if r.body.get("sleep_s"):
                await asyncio.sleep(float(r.body["sleep_s"]))
            if r.body.get("fail"):
                raise ValueError("probe asked to fail")
            out.append({"model": r.model.model_id, "meta": r.model.meta(), "echo": r.body})
        return out
