"""What ``synapse-bridge demo --plugin digits`` needs of this plugin."""

from pathlib import Path

from sklearn.datasets import load_digits

from examples.digits.make_model import write_model_archive

PLUGIN_DIR = Path(__file__).resolve().parent
RELEASE = {"code": "digits-torch", "version": "1.0.0"}
ROWS = [[float(v) for v in row] for row in load_digits().data[:3]]  # a 0, a 1, a 2

__all__ = ["PLUGIN_DIR", "RELEASE", "ROWS", "write_model_archive"]
