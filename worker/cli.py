"""``synapse-bridge``: the one command line of the project."""

from __future__ import annotations

import contextlib
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
    """Run the Celery worker with our settings (extra arguments go to Celery)."""
    from config import get_settings
    from worker.app import app

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
    app.worker_main(argv)


@main.command()
@click.option("--once", is_flag=True, help="One pass over the pending jobs, then exit.")
def intake(once: bool) -> None:
    """Poll the backend for PENDING inference jobs and enqueue each once."""
    from worker.intake import Intake

    runner = Intake.from_settings()
    if once:
        click.echo(f"enqueued {runner.poll_once()} jobs")
        return
    with contextlib.suppress(KeyboardInterrupt):
        runner.run_forever()


@main.command()
@click.option("--model", required=True, help="Model id.")
@click.option("--tenant", default=None, help="Tenant code.")
@click.option("--json", "json_body", default=None, help="Request body (a JSON object).")
@click.option(
    "--file",
    "items_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A batch job: one JSON request body per line (JSONL).",
)
@click.option("--job-id", default=None, help="An existing backend job (else one is created).")
@click.option("--release-checksum", envvar="SYNAPSE_PLUGIN_RELEASE_CHECKSUM", default=None)
@click.option("--release-code", envvar="SYNAPSE_PLUGIN_RELEASE_CODE", default=None)
@click.option("--release-version", default=None)
@click.option(
    "--plugin-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Take code@version from this plugin's config.yaml.",
)
@click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True)
@click.option(
    "--admin-token",
    envvar="SYNAPSE_BACKEND_ADMIN_TOKEN",
    default=None,
    help="Local backend admin token, to create the job.",
)
def submit(
    model: str,
    tenant: str | None,
    json_body: str | None,
    items_file: Path | None,
    job_id: str | None,
    release_checksum: str | None,
    release_code: str | None,
    release_version: str | None,
    plugin_dir: Path | None,
    priority: int,
    admin_token: str | None,
) -> None:
    """Submit one inference job (or a batch job from a JSONL file)."""
    from worker.cli_submit import submit_from_cli

    try:
        out = submit_from_cli(
            model=model,
            tenant=tenant,
            json_body=json_body,
            items_file=items_file,
            job_id=job_id,
            release_checksum=release_checksum,
            release_code=release_code,
            release_version=release_version,
            plugin_dir=plugin_dir,
            priority=priority,
            admin_token=admin_token,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(out)


@main.command()
@click.option("--jobs", default=300, show_default=True, help="Single jobs to submit.")
@click.option(
    "--batch-items", default=200, show_default=True, help="Items of the one batch job (0: none)."
)
@click.option("--concurrency", default=16, show_default=True, help="Worker threads.")
@click.option(
    "--serve-calls",
    default=100,
    show_default=True,
    help="Warm infer_remote calls measured before the jobs.",
)
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
    help="Keep the demo's files (logs, backend DB) here; default: a temp dir.",
)
def demo(
    jobs: int,
    batch_items: int,
    concurrency: int,
    serve_calls: int,
    serve_port: int,
    workdir: Path | None,
) -> None:
    """Run the end-to-end demo on embedded defaults; stops all it starts."""
    from worker.demo import run_demo

    sys.exit(
        run_demo(
            jobs=jobs,
            batch_items=batch_items,
            concurrency=concurrency,
            serve_calls=serve_calls,
            workdir=workdir,
            serve_port=serve_port,
        )
    )


if __name__ == "__main__":
    main()
