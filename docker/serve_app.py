"""The Serve application builder behind the images' ``import_path``.

KubeRay's ``RayService`` (``serveConfigV2``) and ``serve run``/``serve deploy`` config
files name an application by import path. This module gives the example plugin (or any
plugin directory baked into the image) one: ``serve_app:build_app`` with
``args: {plugin_dir: /app/examples/classifier}``. It builds the same application as
``synapse-bridge serve deploy PLUGIN_DIR`` (``serve_runtime.deploy.build_application``);
the route prefix and name come from the serve config. ``Dockerfile.serve`` copies it to
``/app/serve_app.py`` (``PYTHONPATH=/app``).
"""

from typing import Any

from pydantic import BaseModel, ConfigDict

from serve_runtime.deploy import build_application


class BuildArgs(BaseModel):
    """``args:`` of the application in the serve config."""

    model_config = ConfigDict(extra="forbid")

    plugin_dir: str = "/app/examples/classifier"
    action: str = "inference"


def build_app(args: BuildArgs) -> Any:
    """Ray Serve application builder: ``import_path: serve_app:build_app``."""
    return build_application(args.plugin_dir, action=args.action).application
