"""``synapse-bridge serve``: deploy, inspect and delete serve applications.

Added to ``synapse-bridge`` through the ``synapse_bridge.commands`` entry point with the
``serve`` extra: it needs Ray and FastAPI, which the worker image leaves out, so there
the command is not offered and naming it says what to install (worker/cli.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import ray
from ray import serve as ray_serve

from config import get_settings
from serve_runtime import ray_driver
from serve_runtime.applications import routes
from serve_runtime.deploy import deploy


@click.group()
def serve() -> None:
    """Deploy, inspect and delete serve applications."""


@serve.command("deploy")
@click.argument("plugin_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--action", default="inference", show_default=True)
@click.option(
    "--block/--no-block",
    default=None,
    help="Keep serving until Ctrl-C (default: when Ray was started here).",
)
def serve_deploy(plugin_dir: Path, action: str, block: bool | None) -> None:
    """Deploy PLUGIN_DIR's serve action at its route prefix (port 8100 by default)."""
    settings = get_settings()
    try:
        spec = deploy(plugin_dir, action=action, settings=settings)
    except (ValueError, LookupError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{spec.app_name} ready at http://{settings.serve_http_host}:{settings.serve_http_port}"
        f"{spec.route_prefix}/"
    )
    if block is None:
        block = not settings.ray_address
    if block:
        click.echo("serving; Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            ray.shutdown()


def _connect() -> None:
    address = get_settings().ray_address
    try:
        ray_driver.join(address)
    except ConnectionError as e:
        raise click.ClickException(
            f"no Ray cluster at {address or 'auto'}: start one (synapse-bridge serve deploy) "
            "or set RAY_ADDRESS"
        ) from e


@serve.command("status")
def serve_status() -> None:
    """Show the applications and deployments Serve runs."""
    _connect()
    status = ray_serve.status()
    if not status.applications:
        click.echo("no applications")
    route_of = routes()
    for name, application in status.applications.items():
        click.echo(f"{name}: {application.status} route={route_of.get(name) or '-'}")
        for dname, dep in application.deployments.items():
            replicas = ", ".join(f"{k}={v}" for k, v in dep.replica_states.items())
            click.echo(f"  {dname}: {dep.status} replicas[{replicas}]")


@serve.command("delete")
@click.argument("app_name")
def serve_delete(app_name: str) -> None:
    """Delete the application APP_NAME."""
    _connect()
    if app_name not in ray_serve.status().applications:
        raise click.ClickException(f"no application named {app_name!r}")
    ray_serve.delete(app_name)
    click.echo(f"deleted {app_name}")
