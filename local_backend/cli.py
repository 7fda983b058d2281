"""The ``backend`` click group: ``serve`` and ``seed`` (attached to the main CLI as
``synapse-bridge backend ...``; also ``python -m local_backend ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from local_backend import DEFAULT_ADMIN_TOKEN

DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("./.local_backend"),
    envvar="SYNAPSE_BACKEND_DATA_DIR",
    show_default=True,
    show_envvar=True,
    help="Where the SQLite file and model archives live.",
)


@click.group("backend")
def backend() -> None:
    """The local stand-in for the Synapse backend (FastAPI + SQLite)."""


@backend.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8010, type=int, show_default=True)
@DATA_DIR_OPTION
@click.option(
    "--admin-token",
    envvar="SYNAPSE_BACKEND_ADMIN_TOKEN",
    default=DEFAULT_ADMIN_TOKEN,
    show_envvar=True,
    help="Token for the _admin/ endpoints (header Synapse-Admin-Token).",
)
@click.option(
    "--public-url",
    envvar="SYNAPSE_BACKEND_PUBLIC_URL",
    default=None,
    show_envvar=True,
    help="Base of file URLs and next links (default: the request's own base URL).",
)
@click.option(
    "--faults",
    envvar="SYNAPSE_BACKEND_FAULTS",
    default=None,
    show_envvar=True,
    help="Initial fault rules: JSON text or a JSON/YAML file.",
)
@click.option(
    "--seed",
    "seed_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Apply this seed file before serving.",
)
@click.option("--log-level", default="info", show_default=True)
def serve(
    host: str,
    port: int,
    data_dir: Path,
    admin_token: str,
    public_url: str | None,
    faults: str | None,
    seed_file: Path | None,
    log_level: str,
) -> None:
    """Serve the backend API."""
    from local_backend.faults import load_faults
    from local_backend.server import run

    if seed_file is not None:
        _apply_seed_file(seed_file, data_dir)
    run(
        host=host,
        port=port,
        data_dir=data_dir,
        admin_token=admin_token,
        public_url=public_url,
        faults=load_faults(faults) if faults else None,
        log_level=log_level,
    )


@backend.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@DATA_DIR_OPTION
def seed(spec: Path, data_dir: Path) -> None:
    """Apply a seed SPEC (YAML) to the store in --data-dir (directly, no server needed)."""
    summary = _apply_seed_file(spec, data_dir)
    click.echo(json.dumps(summary, indent=2))


def _apply_seed_file(spec_path: Path, data_dir: Path) -> dict[str, object]:
    from pydantic import ValidationError

    from local_backend.db import Database
    from local_backend.seed import apply_seed, load_seed_file

    try:
        spec, base_dir = load_seed_file(spec_path)
    except ValidationError as exc:
        raise click.ClickException(f"invalid seed spec {spec_path}:\n{exc}") from None
    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database.in_dir(data_dir)
    try:
        return apply_seed(db, data_dir, spec, base_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.close()
