"""What ``synapse-bridge demo`` needs of this plugin: where it is, its release, inputs."""

from pathlib import Path

from examples.classifier.model import write_model_archive

PLUGIN_DIR = Path(__file__).resolve().parent
RELEASE = {"code": "example-classifier", "version": "1.0.0"}
ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0], [5.9, 2.8, 4.3, 1.3]]

__all__ = ["PLUGIN_DIR", "RELEASE", "ROWS", "write_model_archive"]
