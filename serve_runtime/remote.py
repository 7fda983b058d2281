"""``infer_remote``: the SDK's blocking call to a deployed endpoint, over our pooled client."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from config import SettingsError, resolve_route_prefix
from config.ids import check_model_id, check_tenant
from serve_runtime.client import default_client

EnvGetter = Callable[[str], str | None]


def env_getter(ctx: Any) -> EnvGetter:
    """Read settings the SDK's way: ``ctx.env.get_str(name)``, a mapping, or os.environ."""
    if ctx is None:
        return os.environ.get
    env = getattr(ctx, "env", ctx)
    get_str = getattr(env, "get_str", None)
    if callable(get_str):

        def read(name: str) -> str | None:
            try:
                value = get_str(name)
            except (KeyError, LookupError):
                return None
            return str(value) if value not in (None, "") else None

        return read
    if isinstance(env, Mapping):
        return lambda name: env.get(name) or None
    raise TypeError("ctx must have .env.get_str(name), be a mapping, or be None")


def infer_remote(params: dict[str, Any], ctx: Any) -> Any:
    """Resolve the route prefix, mint the model token, call, and wait for a deferred result.

    ``params``: ``model`` (id), ``method`` (default post), ``json`` (the body), and
    optionally ``tenant``. A model id or tenant outside config/ids.py's set is a
    ``ValueError`` naming it, before anything is sent. Raises a ``ServeError`` subclass
    on failure.
    """
    get = env_getter(ctx)
    env = {
        name: value
        for name in ("SYNAPSE_PLUGIN_RELEASE_CHECKSUM", "SYNAPSE_PLUGIN_RELEASE_CODE")
        if (value := get(name))
    }
    route_prefix = resolve_route_prefix(env)
    backend_url = get("SYNAPSE_PLUGIN_RUN_HOST") or get("SYNAPSE_HOST")
    token = get("SYNAPSE_ACCESS_TOKEN")
    if not backend_url:
        raise SettingsError("infer_remote needs SYNAPSE_PLUGIN_RUN_HOST or SYNAPSE_HOST")
    if not token:
        raise SettingsError("infer_remote needs SYNAPSE_ACCESS_TOKEN")
    model = params.get("model")
    if model is None:
        raise ValueError("infer_remote: params['model'] is required to choose the model")
    check_model_id(model, "infer_remote params['model']")  # InvalidId, a ValueError
    tenant = params.get("tenant") or get("SYNAPSE_TENANT")
    if tenant:
        check_tenant(tenant, "infer_remote tenant")
    client = default_client()
    return client.call_and_wait(
        route_prefix,
        params.get("json", {}),
        model=model,
        token=token,
        tenant=tenant,
        method=params.get("method", "post"),
        backend_url=backend_url,
    )
