"""Train the PyTorch digits network and write its model archive.

python -m examples.digits.make_model OUT.tar.gz [--seed N] [--version V]

The data set ships with scikit-learn, so training needs no download.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

from examples.digits.model import DigitsNet


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)


def train(seed: int = 0, epochs: int = 60, hidden: int = 64) -> tuple[DigitsNet, float]:
    """Train on 80% of the digits; the accuracy is on the other 20%."""
    torch.manual_seed(seed)
    x, y = digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train_idx, test_idx = order[:cut], order[cut:]
    net = DigitsNet(hidden)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for batch in train_idx.split(128):
            opt.zero_grad()
            loss_fn(net(x[batch]), y[batch]).backward()
            opt.step()
    with torch.inference_mode():
        accuracy = (net(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return net, accuracy


def write_model_archive(out: Path, *, seed: int = 0, version: int = 1) -> dict[str, Any]:
    """Train and write a model archive the local backend serves; returns its meta."""
    net, accuracy = train(seed)
    meta = {
        "kind": "digits-mlp",
        "hidden": net.layers[0].out_features,
        "accuracy": round(accuracy, 4),
        "seed": seed,
        "version": version,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(net.state_dict(), Path(tmp) / "model.pt")
        (Path(tmp) / "meta.json").write_text(json.dumps(meta))
        with tarfile.open(out, "w:gz") as tar:
            for name in ("model.pt", "meta.json"):
                tar.add(Path(tmp) / name, arcname=name)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    meta = write_model_archive(args.out, seed=args.seed, version=args.version)
    print(json.dumps({"archive": str(args.out), **meta}))


if __name__ == "__main__":
    main()
