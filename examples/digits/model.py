"""The model: a small PyTorch network over scikit-learn's bundled 8x8 digits.

64 pixel intensities (0-16, as the data set has them) in, one of ten digits out. An
archive (``examples.digits.make_model``) holds the weights (``model.pt``, a state dict)
and ``meta.json`` (the hidden layer's size, the test accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

N_FEATURES = 64
N_CLASSES = 10
MAX_PIXEL = 16.0


class ModelInputError(ValueError):
    """The request body does not fit the model; the message says how."""


class DigitsNet(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x / MAX_PIXEL)


def to_rows(inputs: Any) -> list[list[float]]:
    """``inputs`` as rows of 64 numbers, or ModelInputError naming what is wrong."""
    if not isinstance(inputs, list) or not inputs:
        raise ModelInputError("inputs must be a non-empty list of rows of 64 numbers")
    for i, row in enumerate(inputs):
        if not isinstance(row, list) or len(row) != N_FEATURES:
            raise ModelInputError(f"inputs[{i}] must be a list of {N_FEATURES} numbers")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in row):
            raise ModelInputError(f"inputs[{i}] holds something that is not a number")
    return inputs


def load(path: Path, device: torch.device) -> DigitsNet:
    """The network of an extracted archive, on ``device``, in eval mode."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    net = DigitsNet(meta["hidden"])
    state = torch.load(Path(path) / "model.pt", map_location=device, weights_only=True)
    net.load_state_dict(state)
    return net.to(device).eval()
