"""``synapse-bridge submit``: a job on the local backend from command-line input, enqueued."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from config import get_settings, load_plugin_config
from local_backend import DEFAULT_ADMIN_TOKEN
from local_backend.client import AdminClient
from worker.submit import submit


def _release(
    checksum: str | None, code: str | None, version: str | None, plugin_dir: Path | None
) -> dict[str, str]:
    if plugin_dir is not None:
        cfg = load_plugin_config(plugin_dir)
        return {"code": cfg.code, "version": cfg.version}
    if checksum:
        return {"checksum": checksum}
    if code:
        return {"code": code, **({"version": version} if version else {})}
    raise ValueError(
        "no release: give --release-checksum, --release-code or --plugin-dir "
        "(or set SYNAPSE_PLUGIN_RELEASE_CHECKSUM / SYNAPSE_PLUGIN_RELEASE_CODE)"
    )


def read_items(path: Path) -> list[dict[str, Any]]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def submit_from_cli(
    *,
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
) -> str:
    if (json_body is None) == (items_file is None):
        raise ValueError("give exactly one of --json or --file")
    body: dict[str, Any] | None = None
    items = None
    if json_body is not None:
        try:
            body = json.loads(json_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--json is not JSON: {e.msg}") from None
        if not isinstance(body, dict):
            raise ValueError("--json must be a JSON object")
    else:
        assert items_file is not None
        items = read_items(items_file)
    release = _release(release_checksum, release_code, release_version, plugin_dir)
    settings = get_settings()
    token = settings.access_token.get_secret_value() if settings.access_token else None
    if not token:
        raise ValueError("set SYNAPSE_ACCESS_TOKEN to the token the job runs with")
    model_id: int | str = int(model) if model.isdigit() else model
    if job_id is None:
        params: dict[str, Any] = {"model": model_id, "method": "post"}
        params["items" if items is not None else "json"] = items if items is not None else body
        with AdminClient(settings.require_backend_url(), admin_token or DEFAULT_ADMIN_TOKEN) as a:
            job_id = a.create_job(
                id=uuid.uuid4().hex,
                tenant=tenant or "-",
                action="inference",
                plugin_release=release,
                params=params,
            )["id"]
    result = submit(
        job_id=job_id,
        model=model_id,
        token=token,
        release=release,
        tenant=tenant,
        json=body,
        items=items,
        priority=priority,
    )
    return json.dumps({"job_id": job_id, "task_id": result.id})
