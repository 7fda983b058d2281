"""Route prefix resolution, exactly in the Synapse SDK's order.

1. ``SYNAPSE_PLUGIN_RELEASE_CHECKSUM`` -> ``/{checksum}``
2. ``SYNAPSE_PLUGIN_RELEASE_CODE``     -> ``/{md5(code)}``
3. ``./config.yaml``                   -> ``/{md5(code@version)}``
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from config.plugin import CONFIG_FILENAME, load_plugin_config


class RoutePrefixError(LookupError):
    """No source for the route prefix; the message says which settings to provide."""


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # an identifier, as in the SDK


def prefix_for_release(
    checksum: str | None = None, code: str | None = None, version: str | None = None
) -> str:
    """The prefix for an explicit release (checksum, code, or code@version)."""
    if checksum:
        return f"/{checksum}"
    if code and version:
        return f"/{_md5(f'{code}@{version}')}"
    if code:
        return f"/{_md5(code)}"
    raise RoutePrefixError("a release needs a checksum or a code to name its route prefix")


def resolve_route_prefix(
    env: Mapping[str, str] | None = None, config_dir: Path | str | None = None
) -> str:
    """Resolve as the SDK does; ``config_dir`` defaults to the working directory."""
    env = os.environ if env is None else env
    checksum = env.get("SYNAPSE_PLUGIN_RELEASE_CHECKSUM")
    if checksum:
        return f"/{checksum}"
    code = env.get("SYNAPSE_PLUGIN_RELEASE_CODE")
    if code:
        return f"/{_md5(code)}"
    path = Path(config_dir if config_dir is not None else Path.cwd()) / CONFIG_FILENAME
    if path.is_file():
        cfg = load_plugin_config(path)
        return f"/{_md5(f'{cfg.code}@{cfg.version}')}"
    raise RoutePrefixError(
        "cannot resolve the serve route prefix: set SYNAPSE_PLUGIN_RELEASE_CHECKSUM or "
        f"SYNAPSE_PLUGIN_RELEASE_CODE, or run where {CONFIG_FILENAME} is ({path} not found)"
    )
