"""The example serve plugin: the numpy classifier behind the SDK's serve API."""

from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException

from examples.classifier.model import ModelInputError, SoftmaxClassifier, to_matrix
from serve_runtime import deferrable
from serve_runtime.deployment import BaseServeDeployment, BatchItem

app = FastAPI(title="example classifier")


class ClassifierDeployment(BaseServeDeployment):
    """``POST /`` with ``{"inputs": [[f1, f2, f3, f4], ...]}``."""

    action_name = "inference"
    app = app

    async def _get_model(self, model_info: dict[str, Any]) -> SoftmaxClassifier:
        return SoftmaxClassifier(model_info["path"])

    @app.post("/")
    @deferrable
    async def infer(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            to_matrix(body.get("inputs"))
        except ModelInputError as e:
            raise HTTPException(
                422, detail={"message": str(e), "code": "invalid_input", "transient": False}
            ) from None
        return await self.predict(body)

    async def infer_batch(self, requests: list[BatchItem]) -> list[dict[str, Any]]:
        """One matrix product for the whole batch (all items share one model)."""
        model: SoftmaxClassifier = requests[0].model
        rows = [to_matrix(r.body["inputs"]) for r in requests]
        proba = model.predict_proba(np.vstack(rows))
        labels = model._labels or []
        out, start = [], 0
        for r in rows:
            p = proba[start : start + len(r)]
            start += len(r)
            out.append(
                {
                    "predictions": [labels[i] for i in p.argmax(axis=1)],
                    "probabilities": np.round(p, 6).tolist(),
                    "model_version": requests[0].model_info.get("version"),
                }
            )
        return out
