"""The PyTorch example plugin: a digits network behind the SDK's serve API.

``POST /`` with ``{"inputs": [[64 pixel values 0-16], ...]}`` answers the digits and
their probabilities. On a GPU host set ``num_gpus`` in ``config.yaml``; the model goes
to CUDA whenever ``torch.cuda.is_available()`` (Ray makes a GPU visible to a replica
that asked for one), else it runs on the CPU. A batch of requests is one forward pass.
"""

from typing import Any

import torch
from fastapi import FastAPI, HTTPException

from examples.digits.model import DigitsNet, ModelInputError, load, to_rows
from serve_runtime import deferrable
from serve_runtime.deployment import BaseServeDeployment, BatchItem

app = FastAPI(title="digits (PyTorch)")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DigitsDeployment(BaseServeDeployment):
    action_name = "inference"
    app = app

    async def _get_model(self, model_info: dict[str, Any]) -> DigitsNet:
        return load(model_info["path"], device())

    async def model_stats(self) -> dict[str, Any]:
        """The runtime's stats, and the device this replica's networks run on."""
        stats = await super().model_stats()
        stats["device"] = device().type
        if stats["device"] == "cuda":
            stats["device_name"] = torch.cuda.get_device_name(0)
        return stats

    async def _release_model(self, model: Any, model_info: dict[str, Any]) -> None:
        """Frees the GPU memory now: the store still holds the module while this runs,
        so its weights move off the device, then the allocator's cached blocks go."""
        if next(model.parameters()).is_cuda:
            model.to("cpu")
            del model
            torch.cuda.empty_cache()

    @app.post("/")
    @deferrable
    async def infer(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            to_rows(body.get("inputs"))
        except ModelInputError as e:
            raise HTTPException(
                422, detail={"message": str(e), "code": "invalid_input", "transient": False}
            ) from None
        return await self.predict(body)

    async def infer_batch(self, requests: list[BatchItem]) -> list[dict[str, Any]]:
        """All the batch's rows in one forward pass (the items share one model)."""
        net: DigitsNet = requests[0].model
        rows = [to_rows(r.body["inputs"]) for r in requests]
        on = next(net.parameters()).device
        with torch.inference_mode():
            x = torch.tensor([row for rs in rows for row in rs], dtype=torch.float32, device=on)
            proba = torch.softmax(net(x), dim=1).cpu()
        out, start = [], 0
        for rs in rows:
            p = proba[start : start + len(rs)]
            start += len(rs)
            out.append(
                {
                    "predictions": p.argmax(dim=1).tolist(),
                    "probabilities": [[round(v, 6) for v in row] for row in p.tolist()],
                    "model_version": requests[0].model_info.get("version"),
                    "device": on.type,
                }
            )
        return out
