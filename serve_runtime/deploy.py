"""``deploy()``: a Serve application from a plugin directory (class + config.yaml).

Ray Serve does the work: ``serve.deployment`` with the config's options,
``serve.ingress`` on the plugin's FastAPI app, ``serve.multiplexed`` bounding the
models per replica. Batching, when configured, is the runtime's ``DeviceBatcher``
(``serve_runtime/batcher.py`` says why not ``serve.batch``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import cloudpickle, serve
from ray.serve.config import RequestRouterConfig

from config import Settings, get_settings, load_plugin_config, resolve_route_prefix
from serve_runtime.action import discover_action
from serve_runtime.deployment import BaseServeDeployment
from serve_runtime.routing import BoundedRequestRouter
from serve_runtime.tickets import TicketStore

# Settings a replica reads itself; passed on so an already-running cluster sees them.
_REPLICA_ENV_PREFIXES = ("SYNAPSE_BRIDGE_", "SYNAPSE_SERVE_SIGNING_KEY_FILE", "SYNAPSE_TEST_")
# Never passed on: Serve's API (serve.status(), the dashboard) shows the runtime_env. A
# replica reads its secrets on its node: its own environment, or a *_FILE setting.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_URL_USERINFO = re.compile(r"://[^/@\s]*@")


def replica_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings a replica is given in its runtime_env: ours, none of them a secret
    (a secret-like name other than a ``*_FILE`` path, or a URL with credentials)."""
    return {
        k: v
        for k, v in environ.items()
        if k.startswith(_REPLICA_ENV_PREFIXES)
        and (k.endswith("_FILE") or not _SECRET_NAME.search(k))
        and not _URL_USERINFO.search(v)
    }


# The ticket store's calls are short (dict lookups): many at once, from every replica.
_TICKET_STORE_CONCURRENCY = 1000


class DeployError(RuntimeError):
    """The plugin cannot be deployed; the message says what to fix."""


@dataclass(frozen=True)
class DeploySpec:
    app_name: str
    route_prefix: str
    application: Any  # ray.serve.Application


def app_name_for(code: str, version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{code}-{version}")


def build_application(
    plugin_dir: Path | str,
    *,
    action: str = "inference",
    settings: Settings | None = None,
    overrides: dict[str, Any] | None = None,
    app_name: str | None = None,
    route_prefix: str | None = None,
) -> DeploySpec:
    """Build (not run) the Serve application for a plugin's serve action.

    ``app_name`` and ``route_prefix`` replace the ones the plugin's release gives: a
    second copy of one plugin (another replica count, say) beside the first.
    """
    settings = settings or get_settings()
    plugin_dir = Path(plugin_dir).resolve()
    cfg = load_plugin_config(plugin_dir)
    action_cfg = cfg.action(action)
    cls = discover_action(plugin_dir, action)
    if not issubclass(cls, BaseServeDeployment):
        raise DeployError(f"{action_cfg.entrypoint} is not a BaseServeDeployment")
    if not isinstance(getattr(cls, "app", None), FastAPI) or cls.app is BaseServeDeployment.app:
        raise DeployError(
            f"{action_cfg.entrypoint} defines no FastAPI app of its own: add `app = FastAPI()` "
            "as a class attribute and decorate its endpoint with `@app.post('/')`"
        )
    opts = action_cfg.serve.model_copy(update=overrides or {})
    # serve.ingress fixes the endpoints' signatures (self injected) on the function
    # objects; by reference, a replica would import fresh, unfixed ones. By value,
    # the fixed functions travel.
    cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])

    configured = type(
        cls.__name__,
        (cls,),
        {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "max_models_per_replica": opts.max_models_per_replica,
            "batch_options": opts.batch.model_dump() if opts.batch else None,
            "deferred_deadline_s": opts.deferred_deadline_s,
            "__init__": _init_with_tickets(cls),
        },
    )
    ingress = serve.ingress(cls.app)(configured)

    actor_options: dict[str, Any] = opts.ray_actor_options.model_dump(exclude_none=True)
    env_vars = replica_env(os.environ)
    module_root = _module_root(plugin_dir, cls.__module__)
    if module_root is not None:
        env_vars["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(module_root), os.environ.get("PYTHONPATH", "")) if p
        )
    actor_options["runtime_env"] = {"env_vars": env_vars}

    kwargs: dict[str, Any] = {
        "name": cls.__name__,
        "max_ongoing_requests": opts.max_ongoing_requests,
        "ray_actor_options": actor_options,
        # Ray's router grows by one entry per distinct id it routes (routing.py).
        "request_router_config": RequestRouterConfig(request_router_class=BoundedRequestRouter),
    }
    if opts.autoscaling_config is not None:
        kwargs["autoscaling_config"] = opts.autoscaling_config.model_dump(exclude_none=True)
    else:
        kwargs["num_replicas"] = opts.num_replicas or 1

    # Deferred tickets answerable on every replica: one store, bound into the app.
    tickets = serve.deployment(
        TicketStore,
        name="TicketStore",
        num_replicas=1,
        max_ongoing_requests=_TICKET_STORE_CONCURRENCY,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env_vars}},
    ).bind()
    application = serve.deployment(**kwargs)(ingress).bind(settings.require_backend_url(), tickets)
    env = {
        k: v
        for k, v in {
            "SYNAPSE_PLUGIN_RELEASE_CHECKSUM": settings.plugin_release_checksum,
            "SYNAPSE_PLUGIN_RELEASE_CODE": settings.plugin_release_code,
        }.items()
        if v
    }
    return DeploySpec(
        app_name=app_name or app_name_for(cfg.code, cfg.version),
        route_prefix=route_prefix or resolve_route_prefix(env, plugin_dir),
        application=application,
    )


def _init_with_tickets(cls: type[BaseServeDeployment]) -> Callable[..., None]:
    """An ``__init__`` taking the ticket store's handle too: the plugin's own
    ``__init__(self, backend_url)`` (the SDK's signature) runs unchanged after it."""

    def __init__(self: BaseServeDeployment, backend_url: str, tickets: Any) -> None:
        self._ticket_store = tickets
        cls.__init__(self, backend_url)

    return __init__


def _module_root(plugin_dir: Path, module: str) -> Path | None:
    """The directory to put on PYTHONPATH when the plugin is not an installed package."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if origin is not None and plugin_dir in origin.parents:
        return plugin_dir
    return None


def ensure_ray(settings: Settings | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS when set, else start a local Ray in this process.

    Never the cluster Ray would find by itself: ``ray.init()`` joins whatever the
    last ``ray start`` on this machine wrote to ``ray_current_cluster``, even one long
    dead, so "local" is said explicitly.
    """
    settings = settings or get_settings()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
    if settings.ray_address:
        kwargs["address"] = settings.ray_address
    else:
        kwargs["address"] = "local"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def ensure_serve(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    serve.start(http_options={"host": settings.serve_http_host, "port": settings.serve_http_port})


def deploy(
    plugin_dir: Path | str,
    *,
    action: str = "inference",
    settings: Settings | None = None,
    overrides: dict[str, Any] | None = None,
    app_name: str | None = None,
    route_prefix: str | None = None,
    blocking: bool = False,
) -> DeploySpec:
    """Deploy a plugin's serve action at its resolved route prefix (HTTP port 8100 default)."""
    settings = settings or get_settings()
    ensure_ray(settings)
    ensure_serve(settings)
    spec = build_application(
        plugin_dir,
        action=action,
        settings=settings,
        overrides=overrides,
        app_name=app_name,
        route_prefix=route_prefix,
    )
    serve.run(
        spec.application, name=spec.app_name, route_prefix=spec.route_prefix, blocking=blocking
    )
    return spec
