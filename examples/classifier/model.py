"""The model: a multinomial logistic regression over 4 features, 3 classes.

Weights are ``.npy`` files in the model directory, memory-mapped on first use (not
in ``_get_model``): the directory has to outlive the load, which the runtime ensures.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 4
LABELS = ["setosa", "versicolor", "virginica"]


class ModelInputError(ValueError):
    """The request body does not fit the model; the message says how."""


class SoftmaxClassifier:
    """Lazy: files are read at the first prediction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._w: np.ndarray | None = None
        self._b: np.ndarray | None = None
        self._labels: list[str] | None = None
        self.released = False

    def _ensure_loaded(self) -> None:
        if self._w is None:
            self._w = np.load(self.path / "weights.npy", mmap_mode="r")
            self._b = np.load(self.path / "bias.npy")
            self._labels = json.loads((self.path / "labels.json").read_text())

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self._ensure_loaded()
        assert self._w is not None and self._b is not None
        logits = x @ self._w + self._b
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, inputs: list[list[float]]) -> dict[str, Any]:
        x = to_matrix(inputs)
        proba = self.predict_proba(x)
        assert self._labels is not None
        return {
            "predictions": [self._labels[i] for i in proba.argmax(axis=1)],
            "probabilities": np.round(proba, 6).tolist(),
        }

    def release(self) -> None:
        self._w = self._b = None
        self.released = True


def to_matrix(inputs: Any) -> np.ndarray:
    if not isinstance(inputs, list) or not inputs:
        raise ModelInputError("'inputs' must be a non-empty list of rows of 4 numbers")
    try:
        x = np.asarray(inputs, dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelInputError("'inputs' rows must hold numbers only") from None
    if x.ndim != 2 or x.shape[1] != N_FEATURES:
        raise ModelInputError(f"'inputs' must be rows of {N_FEATURES} numbers, got {x.shape}")
    return x


def synthetic_data(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes shaped like the iris data set (means from its class means)."""
    rng = np.random.default_rng(seed)
    means = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    y = rng.integers(0, 3, size=n)
    x = means[y] + rng.normal(scale=0.35, size=(n, N_FEATURES))
    return x, y


def train(
    seed: int = 0, epochs: int = 400, lr: float = 0.1
) -> tuple[np.ndarray, np.ndarray, float]:
    """Gradient descent on cross-entropy; returns weights, bias and training accuracy."""
    x, y = synthetic_data(seed)
    onehot = np.eye(3)[y]
    w = np.zeros((N_FEATURES, 3))
    b = np.zeros(3)
    for _ in range(epochs):
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= lr * x.T @ grad
        b -= lr * grad.sum(axis=0)
    accuracy = float(((x @ w + b).argmax(axis=1) == y).mean())
    return w, b, accuracy


def write_model_dir(out: Path, *, seed: int = 0, version: int = 1) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    w, b, accuracy = train(seed)
    np.save(out / "weights.npy", w)
    np.save(out / "bias.npy", b)
    (out / "labels.json").write_text(json.dumps(LABELS))
    meta = {"seed": seed, "version": version, "train_accuracy": accuracy}
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def write_model_archive(archive: Path, *, seed: int = 0, version: int = 1) -> dict[str, Any]:
    """Train and pack a model as a ``.tar.gz`` archive (what the backend serves)."""
    with tempfile.TemporaryDirectory() as tmp:
        meta = write_model_dir(Path(tmp), seed=seed, version=version)
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            for f in sorted(Path(tmp).iterdir()):
                tar.add(f, arcname=f.name)
    return meta
