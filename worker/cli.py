"""``synapse-bridge``: the production command line (``worker``, ``intake``, ``serve``).

Other installed packages add commands through the entry-point group
``synapse_bridge.commands`` (name = command name, value = a click command): this
project's ``devtools`` adds ``demo`` and ``submit``, ``local_backend`` adds ``backend``
(pyproject.toml). Such a command is imported only when it is named (or ``--help`` lists
it), and only when its package is installed: the worker image has neither package, so
its CLI is this module's commands alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import click
from celery.bin.celery import celery as celery_command

from config import configure_logging, get_settings
from worker.intake import Intake

COMMANDS_GROUP = "synapse_bridge.commands"


def _installed(ep: EntryPoint) -> bool:
    """Whether the entry point's top-level package is importable (checked, not imported)."""
    return importlib.util.find_spec(ep.module.partition(".")[0]) is not None


class BridgeCLI(click.Group):
    """This module's commands, then those the ``synapse_bridge.commands`` entry points add."""

    def _extensions(self) -> dict[str, EntryPoint]:
        return {
            ep.name: ep
            for ep in entry_points(group=COMMANDS_GROUP)
            if ep.name not in self.commands and _installed(ep)
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._extensions()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and (ep := self._extensions().get(cmd_name)) is not None:
            command = ep.load()
            if not isinstance(command, click.Command):
                raise TypeError(f"entry point {ep.value} ({COMMANDS_GROUP}) is not a click command")
            self.add_command(command, cmd_name)
        return command


@click.group(cls=BridgeCLI)
def main() -> None:
    """Bridge a Celery job queue to Ray Serve (Synapse serve runtime)."""

    try:
        settings = get_settings()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    configure_logging(settings.log_format, settings.log_level)


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
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            ray.shutdown()


def _connect() -> None:
    import ray

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
    for name, application in status.applications.items():
        click.echo(f"{name}: {application.status} route={application.route_prefix or '-'}")
        for dname, dep in application.deployments.items():
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


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=None,
    help="Threads (default SYNAPSE_BRIDGE_WORKER_CONCURRENCY).",
)
@click.option(
    "--pool",
    type=click.Choice(["threads", "prefork", "solo"]),
    default="threads",
    show_default=True,
)
@click.option("--queues", "-Q", default="inference", show_default=True)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    concurrency: int | None, pool: str, queues: str, loglevel: str, celery_args: tuple[str, ...]
) -> None:
    """Run the Celery worker with our settings (extra arguments go to Celery).

    Exits with Celery's status: after an "Unrecoverable error" that is 1, so a
    supervisor restarting on failure restarts the worker.
    """

    settings = get_settings()
    # Celery reads "prefork" as "the default" and would use the app's worker_pool
    # (threads); "processes" names the prefork pool unambiguously.
    argv = [
        "worker",
        f"--pool={'processes' if pool == 'prefork' else pool}",
        f"--queues={queues}",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        "--without-mingle",
        "--without-gossip",
        *celery_args,
    ]
    # As ``celery --app worker.app worker ...`` does, exiting with the worker's status
    # (``app.worker_main`` drops it).
    celery_command.main(args=["--app", "worker.app", *argv], prog_name="synapse-bridge")


@main.command()
@click.option("--once", is_flag=True, help="One pass over the pending jobs, then exit.")
def intake(once: bool) -> None:
    """Poll the backend for PENDING inference jobs and enqueue each once."""

    runner = Intake.from_settings()
    if once:
        click.echo(f"enqueued {runner.poll_once()} jobs")
        return
    with contextlib.suppress(KeyboardInterrupt):
        runner.run_forever()


if __name__ == "__main__":
    main()
