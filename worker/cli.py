"""``synapse-bridge``: the production command line (``worker``, ``intake``).

Other commands join through the entry-point group ``synapse_bridge.commands`` (name =
command name, value = a click command, pyproject.toml): ``serve_runtime`` adds ``serve``,
``devtools`` adds ``demo`` and ``submit``, ``local_backend`` adds ``backend``. Such a
command is imported only when it is named (or ``--help`` lists it), and offered only
when it can be: its package must be installed (the worker image has neither devtools
nor local_backend), and so must the extra the entry point names (``serve [serve]``:
the worker image has ``serve_runtime`` for its client, but not Ray). Naming a command
whose extra is missing says what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import click
from celery.bin.celery import celery as celery_command

from config import configure_logging, get_settings
from worker.intake import Intake

COMMANDS_GROUP = "synapse_bridge.commands"
DISTRIBUTION = "synapse-serve-bridge"


def _installed(ep: EntryPoint) -> bool:
    """Whether the entry point's top-level package is importable (checked, not imported)."""
    return importlib.util.find_spec(ep.module.partition(".")[0]) is not None


class BridgeCLI(click.Group):
    """This module's commands, then those the ``synapse_bridge.commands`` entry points add."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unavailable: dict[str, str] = {}  # command -> why it cannot load here

    def _extensions(self) -> dict[str, EntryPoint]:
        return {
            ep.name: ep
            for ep in entry_points(group=COMMANDS_GROUP)
            if ep.name not in self.commands and _installed(ep)
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._extensions()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """None for a command whose extra is missing, so ``--help`` leaves it out."""
        command = super().get_command(ctx, cmd_name)
        if command is None and (ep := self._extensions().get(cmd_name)) is not None:
            try:
                command = ep.load()
            except ModuleNotFoundError as e:
                if (e.name or "").partition(".")[0] == ep.module.partition(".")[0]:
                    raise  # our own module is broken, not an extra missing
                extra = f"{DISTRIBUTION}[{','.join(ep.extras)}]" if ep.extras else DISTRIBUTION
                self._unavailable[cmd_name] = (
                    f"`{cmd_name}` needs the Python package {e.name!r}, which is not "
                    f"installed here: pip install '{extra}'"
                )
                return None
            if not isinstance(command, click.Command):
                raise TypeError(f"entry point {ep.value} ({COMMANDS_GROUP}) is not a click command")
            self.add_command(command, cmd_name)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and self.get_command(ctx, args[0]) is None and args[0] in self._unavailable:
            raise click.UsageError(self._unavailable[args[0]], ctx)
        return super().resolve_command(ctx, args)


@click.group(cls=BridgeCLI)
def main() -> None:
    """Bridge a Celery job queue to Ray Serve (Synapse serve runtime)."""

    try:
        settings = get_settings()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    configure_logging(settings.log_format, settings.log_level)


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
