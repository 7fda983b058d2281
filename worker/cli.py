"""``synapse-bridge``: the one command line of the project."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from local_backend.cli import backend


@click.group()
def main() -> None:
    """Bridge a Celery job queue to Ray Serve (Synapse serve runtime)."""
    from config import configure_logging, get_settings

    try:
        settings = get_settings()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    configure_logging(settings.log_format, settings.log_level)


main.add_command(backend)


@main.group()
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
    import ray

    from config import get_settings
    from serve_runtime.deploy import deploy

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
            import time

            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            ray.shutdown()


def _connect() -> None:
    import ray

    from config import get_settings

    address = get_settings().ray_address or "auto"
    try:
        ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    except ConnectionError as e:
        raise click.ClickException(
            f"no Ray cluster at {address}: start one (synapse-bridge serve deploy) "
            "or set RAY_ADDRESS"
        ) from e


@serve.command("status")
def serve_status() -> None:
    """Show the applications and deployments Serve runs."""
    from ray import serve as ray_serve

    _connect()
    status = ray_serve.status()
    if not status.applications:
        click.echo("no applications")
    for name, app in status.applications.items():
        click.echo(f"{name}: {app.status} route={app.route_prefix or '-'}")
        for dname, dep in app.deployments.items():
            replicas = ", ".join(f"{k}={v}" for k, v in dep.replica_states.items())
            click.echo(f"  {dname}: {dep.status} replicas[{replicas}]")


@serve.command("delete")
@click.argument("app_name")
def serve_delete(app_name: str) -> None:
    """Delete the application APP_NAME."""
    from ray import serve as ray_serve

    _connect()
    if app_name not in ray_serve.status().applications:
        raise click.ClickException(f"no application named {app_name!r}")
    ray_serve.delete(app_name)
    click.echo(f"deleted {app_name}")


@main.command()
@click.option("--calls", default=200, show_default=True, help="Warm infer_remote calls.")
@click.option(
    "--serve-port",
    default=8100,
    show_default=True,
    help="Serve HTTP port (a free one is used when busy).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's files here (default: a temporary directory).",
)
def demo(calls: int, serve_port: int, workdir: Path | None) -> None:
    """Run the end-to-end demo on embedded defaults; stops all it starts."""
    from worker.demo import run_demo

    sys.exit(run_demo(calls=calls, workdir=workdir, serve_port=serve_port))


if __name__ == "__main__":
    main()
