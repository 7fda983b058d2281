"""The development commands of ``synapse-bridge``: ``demo`` and ``submit``.

Each is an entry point of the group ``synapse_bridge.commands`` (pyproject.toml), which
``worker.cli`` loads when the command is named; ``backend`` is ``local_backend.cli``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from devtools.cli_submit import submit_from_cli
from devtools.demo import run_demo
from devtools.demo_env import DEMO_PLUGINS


@click.command()
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
    """Submit one inference job (or a batch job from a JSONL file) via the local backend."""
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


@click.command()
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
@click.option(
    "--plugin",
    type=click.Choice(DEMO_PLUGINS),
    default="classifier",
    show_default=True,
    help="The example plugin: the numpy classifier, or the PyTorch digits network.",
)
def demo(
    jobs: int,
    batch_items: int,
    concurrency: int,
    serve_calls: int,
    serve_port: int,
    workdir: Path | None,
    plugin: str,
) -> None:
    """Run the end-to-end demo on embedded defaults; stops all it starts."""
    sys.exit(
        run_demo(
            jobs=jobs,
            batch_items=batch_items,
            concurrency=concurrency,
            serve_calls=serve_calls,
            workdir=workdir,
            serve_port=serve_port,
            plugin_name=plugin,
        )
    )
